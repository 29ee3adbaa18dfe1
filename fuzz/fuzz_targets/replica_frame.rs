//! The replica's frame decoder on arbitrary bytes: never panics, and a
//! frame it accepts re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvol_replica::direct::decode_located;
use rvol_replica::proto::{decode_extents, decode_request, Hello, RequestHeader, ReplyHeader};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, payload, used)) = decode_request(data) {
        assert!(used <= data.len());
        assert_eq!(&h.encode(payload)[..], &data[..rvol_replica::proto::REQUEST_HEADER_LEN]);
    }
    let _ = ReplyHeader::decode(data);
    let _ = RequestHeader::decode(data);
    let _ = Hello::decode(data);
    let _ = decode_extents(data);
    let _ = decode_located(0, data, 1 << 20);
});
