//! From CSI's names to the cluster's. A CSI name (Kubernetes gives
//! `pvc-UUID`) is kept as the volume's name when it is one (1-63 of
//! `[A-Za-z0-9._-]`); any other is mapped to `csi-` and a UUID derived
//! from it, the same every time, so a repeated CreateVolume finds the
//! volume the first one made.

use rvol_cluster::model::VolumeName;

/// The namespace of the derived UUIDs (a fixed, random one).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a1f_3c9e_58b2_4d07_9e41_c2d8_0b7a_51f3);

pub fn volume_name(csi_name: &str) -> String {
    if VolumeName::new(csi_name).is_ok() {
        csi_name.to_string()
    } else {
        let id = uuid::Uuid::new_v5(&NAMESPACE, csi_name.as_bytes());
        format!("csi-{}", id.simple())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_or_mapped_the_same_way_every_time() {
        assert_eq!(volume_name("pvc-0d3e9a"), "pvc-0d3e9a");
        let odd = "sanity Node Service/1 with spaces";
        assert_eq!(volume_name(odd), volume_name(odd));
        assert!(VolumeName::new(&volume_name(odd)).is_ok());
        assert_ne!(
            volume_name(odd),
            volume_name("sanity Node Service/2 with spaces")
        );
        assert!(VolumeName::new(&volume_name(&"x".repeat(200))).is_ok());
    }
}
