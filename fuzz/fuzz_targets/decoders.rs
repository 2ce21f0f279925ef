//! Fuzzes every stateless decoder in `ringsocks::proto` with the same input.
//!
//! Besides "never panics", it checks the round-trip property the relay
//! relies on: whatever decodes re-encodes to exactly the bytes consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsocks::proto::codec::*;
use ringsocks::proto::udp::{decode_udp_header, encode_udp_header_addr};
use ringsocks::proto::Addr;

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Done(a, n)) = Addr::decode(data) {
        let mut v = Vec::new();
        a.encode(&mut v);
        assert_eq!(v, &data[..n]);
        let _ = a.to_string();
    }
    if let Ok(Decoded::Done(g, n)) = decode_greeting(data) {
        let mut v = Vec::new();
        encode_greeting(&g.methods, &mut v);
        assert_eq!(v, &data[..n]);
    }
    if let Ok(Decoded::Done(up, n)) = decode_userpass(data) {
        let mut v = Vec::new();
        encode_userpass(&up.uname, &up.passwd, &mut v).unwrap();
        assert_eq!(v, &data[..n]);
    }
    if let Ok(Decoded::Done(r, n)) = decode_request(data) {
        let mut v = Vec::new();
        encode_request(r.cmd, &r.dst, &mut v);
        assert_eq!(v, &data[..n]);
    }
    if let Ok(Decoded::Done(r, n)) = decode_reply(data) {
        let mut v = Vec::new();
        encode_reply(r.rep, &r.bnd, &mut v);
        assert_eq!(v, &data[..n]);
    }
    let _ = decode_method_selection(data);
    let _ = decode_userpass_status(data);
    if let Ok((h, off)) = decode_udp_header(data) {
        let mut v = Vec::new();
        encode_udp_header_addr(h.frag, &h.dst, &mut v);
        assert_eq!(v, &data[..off]);
    }
});
