//! The node's mount table, read from `/proc/self/mountinfo`, and
//! unmounting. Unpublishing and unstaging are undone only where something
//! is mounted, so repeating them (the kubelet does) is harmless.

use std::path::Path;

/// Undoes the escapes mountinfo writes for space, tab, newline and `\`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The mount points of `mountinfo`'s text.
fn mount_points(mountinfo: &str) -> impl Iterator<Item = String> + '_ {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
}

/// The source (the device) of what is mounted at `path`, the last mount
/// there winning.
pub fn source(path: &Path) -> std::io::Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(source_in(&text, &path.to_string_lossy()))
}

fn source_in(mountinfo: &str, path: &str) -> Option<String> {
    mountinfo
        .lines()
        .rev()
        .filter(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(path))
        .find_map(|l| l.split_once(" - ")?.1.split(' ').nth(1).map(unescape))
}

/// Whether something is mounted at `path`.
pub fn is_mounted(path: &Path) -> std::io::Result<bool> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let path = path.to_string_lossy();
    let found = mount_points(&text).any(|m| m == path);
    Ok(found)
}

/// Unmounts `path` if something is mounted there.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if !is_mounted(path)? {
        return Ok(());
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_and_unescaped() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/x rw\n\
                    37 35 98:0 / /var/lib/kubelet/pods/x/volumes/vol rw - ext4 /dev/y rw\n";
        let points: Vec<String> = mount_points(text).collect();
        assert_eq!(points, ["/mnt/a b", "/var/lib/kubelet/pods/x/volumes/vol"]);
        assert_eq!(source_in(text, "/mnt/a b").as_deref(), Some("/dev/x"));
        let over = format!("{text}38 36 98:1 / /mnt/a\\040b rw - xfs /dev/z rw\n");
        assert_eq!(source_in(&over, "/mnt/a b").as_deref(), Some("/dev/z"));
        assert_eq!(source_in(text, "/nowhere"), None);
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }

    #[test]
    fn the_root_is_mounted_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_mounted(tmp.path()).unwrap());
        unmount(tmp.path()).unwrap();
    }
}
