//! Malformed and hostile NBD clients: each gets a clear error or loses its
//! own connection, and other clients carry on.

mod common;

use std::io::Write;

use common::*;

#[test]
fn hostile_clients_lose_only_their_own_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = three_replicas(tmp.path(), "8M");
    let (mut engine, uri, _) = start_engine("vol", "8M", &addrs(&rs), &[]);
    let size = 8u64 << 20;

    // A well-behaved client that must be unaffected throughout.
    let mut good = RawNbd::connect(&uri);
    assert_eq!(good.go("vol"), REP_ACK);
    good.request(1, 1, 0, 4096, &[0x42; 4096]);
    assert_eq!(good.reply(0).0, 0);

    // Wrong export name with GO: an error reply, and negotiation goes on.
    let mut c = RawNbd::connect(&uri);
    assert_eq!(c.go("nope"), REP_ERR_UNKNOWN);
    c.option(42, b"");
    assert_eq!(c.option_reply().0, REP_ERR_UNSUP);
    c.option(OPT_ABORT, b"");
    assert_eq!(c.option_reply().0, REP_ACK);
    // Wrong export name with EXPORT_NAME can only be answered by closing.
    let mut c = RawNbd::connect(&uri);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());

    // Errors that keep the connection.
    let mut c = RawNbd::connect(&uri);
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
    let mut c = RawNbd::connect(&uri);
    assert_eq!(c.go("vol"), REP_ACK);
    c.0.write_all(&[0xde; 28]).unwrap();
    assert!(c.is_closed());

    // A client that disconnects in the middle of a write payload.
    let mut c = RawNbd::connect(&uri);
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
    qemu_io(&uri, &["read -P 0x42 0 4096"]);
}
