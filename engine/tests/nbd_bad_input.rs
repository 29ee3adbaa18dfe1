//! Malformed and hostile NBD clients: each gets a clear error or loses its
//! own connection, and other clients carry on.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

struct Raw(TcpStream);

impl Raw {
    fn connect(uri: &str) -> Raw {
        let addr = uri.trim_start_matches("nbd://");
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut hello = [0u8; 18];
        r.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        r.0.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        r
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Reads one option reply: (type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (kind, d)
    }

    fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (kind, _) = self.option_reply();
            if kind != 3 {
                return kind;
            }
        }
    }

    fn request(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (error, cookie), then `data` bytes on success.
    fn reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data } else { 0 }];
        self.0.read_exact(&mut d).unwrap();
        (err, cookie, d)
    }

    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn hostile_clients_lose_only_their_own_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "8M");
    let (mut engine, uri, _) = start_engine("vol", "8M", &addrs(&rs), &[]);
    let size = 8u64 << 20;

    // A well-behaved client that must be unaffected throughout.
    let mut good = Raw::connect(&uri);
    assert_eq!(good.go("vol"), REP_ACK);
    good.request(1, 1, 0, 4096, &[0x42; 4096]);
    assert_eq!(good.reply(0).0, 0);

    // Wrong export name with GO: an error reply, and negotiation goes on.
    let mut c = Raw::connect(&uri);
    assert_eq!(c.go("nope"), REP_ERR_UNKNOWN);
    c.option(42, b"");
    assert_eq!(c.option_reply().0, REP_ERR_UNSUP);
    c.option(OPT_ABORT, b"");
    assert_eq!(c.option_reply().0, REP_ACK);
    // Wrong export name with EXPORT_NAME can only be answered by closing.
    let mut c = Raw::connect(&uri);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());

    // Errors that keep the connection.
    let mut c = Raw::connect(&uri);
    assert_eq!(c.go(""), REP_ACK);
    c.request(0, 10, size - 512, 4096, &[]); // read past the end
    assert_eq!(c.reply(0), (22, 10, vec![]));
    c.request(1, 11, size, 512, &[0u8; 512]); // write past the end
    assert_eq!(c.reply(0), (28, 11, vec![]));
    c.request(99, 12, 0, 512, &[]); // unknown command
    assert_eq!(c.reply(0), (22, 12, vec![]));
    c.request(0, 13, 0, 64 << 20, &[]); // oversized read
    assert_eq!(c.reply(0), (75, 13, vec![]));
    c.request(0, 14, 0, 4096, &[]);
    let (err, cookie, data) = c.reply(4096);
    assert_eq!((err, cookie), (0, 14));
    assert_eq!(data, vec![0x42; 4096]);

    // An oversized write cannot be framed: that connection closes.
    c.request(1, 15, 0, 64 << 20, &[]);
    assert!(c.is_closed());

    // Bad magic: closed.
    let mut c = Raw::connect(&uri);
    assert_eq!(c.go("vol"), REP_ACK);
    c.0.write_all(&[0xde; 28]).unwrap();
    assert!(c.is_closed());

    // A client that disconnects in the middle of a write payload.
    let mut c = Raw::connect(&uri);
    assert_eq!(c.go("vol"), REP_ACK);
    c.request(1, 16, 8192, 1 << 20, &[0x99; 1000]);
    drop(c);

    // The good client and the engine are fine, and the torn write left
    // nothing behind.
    good.request(0, 2, 0, 4096, &[]);
    let (err, _, data) = good.reply(4096);
    assert_eq!(err, 0);
    assert_eq!(data, vec![0x42; 4096]);
    good.request(0, 3, 8192, 4096, &[]);
    assert_eq!(good.reply(4096).2, vec![0u8; 4096]);
    assert!(engine.is_running());
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x42 0 4096"]);
}
