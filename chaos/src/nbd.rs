//! A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies), one
//! request at a time: all the soak's clients need, with every failure an
//! error rather than a panic, since the soak breaks its servers.

use std::io::{Error, ErrorKind, Read, Result, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;

pub struct Nbd {
    s: TcpStream,
    cookie: u64,
}

fn protocol(what: String) -> Error {
    Error::new(ErrorKind::InvalidData, what)
}

impl Nbd {
    /// Connects and enters transmission on the default export. `timeout`
    /// bounds the connection and every later answer.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Nbd> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || hello[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(protocol("not a newstyle NBD server".into()));
        }
        s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut go = IHAVEOPT.to_be_bytes().to_vec();
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&0u32.to_be_bytes()); // the default export
        go.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        s.write_all(&go)?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            if len > 4096 {
                return Err(protocol(format!("option reply of {len} bytes")));
            }
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d)?;
            match kind {
                REP_ACK => return Ok(Nbd { s, cookie: 0 }),
                REP_INFO => continue,
                _ => return Err(protocol(format!("NBD_OPT_GO refused ({kind:#x})"))),
            }
        }
    }

    /// Sends one request and waits for its answer: `Ok(Ok(data))` (the
    /// `read` bytes of a read), `Ok(Err(errno))` when the server refused,
    /// `Err` when no answer came.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<std::result::Result<Vec<u8>, u32>> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
        if magic != REPLY_MAGIC || cookie != self.cookie {
            return Err(protocol(format!(
                "reply magic {magic:#x} cookie {cookie} (sent {})",
                self.cookie
            )));
        }
        if err != 0 {
            return Ok(Err(err));
        }
        let mut data = vec![0u8; if cmd == CMD_READ { len as usize } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok(Ok(data))
    }
}
