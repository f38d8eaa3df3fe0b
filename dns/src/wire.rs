//! DNS message handling at the byte level: parsing a query defensively, building a
//! response, encoding it within the client's payload size (TC when it doesn't fit),
//! and FORMERR replies for messages hickory cannot parse.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::Record;

/// Smallest UDP payload every client accepts (RFC 1035).
const MIN_UDP_PAYLOAD: u16 = 512;
/// Largest UDP response we send whatever the client advertises: bigger datagrams
/// fragment, and fragments are lost or spoofed (DNS flag day 2020 suggests 1232).
const MAX_UDP_PAYLOAD: u16 = 4096;
/// What we advertise in our OPT record.
const OUR_UDP_PAYLOAD: u16 = 1232;
/// Header length: anything shorter cannot even be answered.
const HEADER_LEN: usize = 12;

/// A well-formed standard query with exactly one question.
pub(crate) struct Request {
    pub id: u16,
    pub query: Query,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// Present when the client sent an OPT record; its payload size bounds UDP replies.
    pub edns: Option<Edns>,
}

/// What to do with a received message.
pub(crate) enum Parsed {
    Query(Request),
    /// An immediate error reply (FORMERR, NOTIMP).
    Reply(Vec<u8>),
    /// No reply is possible or wise (shorter than a header, or a response packet,
    /// which we never answer so as not to loop with another server).
    Drop,
}

pub(crate) fn parse(bytes: &[u8]) -> Parsed {
    if bytes.len() < HEADER_LEN || bytes[2] & 0x80 != 0 {
        return Parsed::Drop;
    }
    let Ok(msg) = Message::from_vec(bytes) else {
        return Parsed::Reply(header_only_error(bytes, ResponseCode::FormErr));
    };
    if msg.metadata.op_code != OpCode::Query {
        return Parsed::Reply(header_only_error(bytes, ResponseCode::NotImp));
    }
    let mut queries = msg.queries;
    // Zero or several questions: no server answers those (RFC 9619).
    let (Some(query), true) = (queries.pop(), queries.is_empty()) else {
        return Parsed::Reply(header_only_error(bytes, ResponseCode::FormErr));
    };
    Parsed::Query(Request {
        id: msg.metadata.id,
        query,
        recursion_desired: msg.metadata.recursion_desired,
        checking_disabled: msg.metadata.checking_disabled,
        edns: msg.edns,
    })
}

/// A datagram too large to be a query, of which only the beginning was read.
pub(crate) fn parse_oversized(bytes: &[u8]) -> Parsed {
    if bytes.len() < HEADER_LEN || bytes[2] & 0x80 != 0 {
        return Parsed::Drop;
    }
    Parsed::Reply(header_only_error(bytes, ResponseCode::FormErr))
}

/// A 12-byte reply echoing the id, opcode and RD bit of `bytes` (at least a header).
fn header_only_error(bytes: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let flags_hi = 0x80 | (bytes[2] & 0x79); // QR, opcode, RD
    let flags_lo = u16::from(rcode) as u8 & 0x0f;
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&bytes[..2]);
    out[2] = flags_hi;
    out[3] = flags_lo;
    out
}

impl Request {
    /// Largest response this client accepts over UDP.
    pub fn max_udp_payload(&self) -> usize {
        let advertised = self
            .edns
            .as_ref()
            .map_or(MIN_UDP_PAYLOAD, |e| e.max_payload());
        usize::from(advertised.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD))
    }

    /// A response skeleton: same id and question, our OPT if the client sent one.
    pub fn response(&self, rcode: ResponseCode) -> Message {
        let mut msg = Message::new(self.id, MessageType::Response, OpCode::Query);
        msg.metadata.recursion_desired = self.recursion_desired;
        msg.metadata.checking_disabled = self.checking_disabled;
        msg.metadata.response_code = rcode;
        msg.add_query(self.query.clone());
        if self.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_UDP_PAYLOAD);
            msg.set_edns(edns);
        }
        msg
    }

    /// A full response with the given sections.
    pub fn response_with(
        &self,
        rcode: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
        additionals: Vec<Record>,
    ) -> Message {
        let mut msg = self.response(rcode);
        msg.answers = answers;
        msg.authorities = authorities;
        msg.additionals = additionals;
        msg
    }
}

/// Encodes `msg`; if it exceeds `limit`, sends the header, question and OPT only with TC
/// set, so the client retries over TCP. Returns the bytes and whether it truncated.
pub(crate) fn encode(msg: &Message, limit: usize) -> (Vec<u8>, bool) {
    match msg.to_vec() {
        Ok(bytes) if bytes.len() <= limit => (bytes, false),
        Ok(_) => (encode_or_servfail(&msg.truncate()), true),
        Err(e) => {
            tracing::warn!(error = %e, "encoding DNS response failed");
            let mut fail = msg.truncate();
            fail.metadata.truncation = false;
            fail.metadata.response_code = ResponseCode::ServFail;
            (encode_or_servfail(&fail), false)
        }
    }
}

fn encode_or_servfail(msg: &Message) -> Vec<u8> {
    msg.to_vec().unwrap_or_else(|_| {
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&msg.metadata.id.to_be_bytes());
        header_only_error(&header, ResponseCode::ServFail)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_response_packets_are_dropped() {
        assert!(matches!(parse(&[1, 2, 3]), Parsed::Drop));
        let mut resp = [0u8; 12];
        resp[2] = 0x80;
        assert!(matches!(parse(&resp), Parsed::Drop));
    }

    #[test]
    fn garbage_after_header_gets_formerr_with_same_id() {
        let bytes = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let Parsed::Reply(reply) = parse(&bytes) else {
            panic!("expected a reply")
        };
        assert_eq!(&reply[..2], &[0xab, 0xcd]);
        assert_eq!(reply[2] & 0x80, 0x80);
        assert_eq!(reply[3] & 0x0f, 1);
    }
}
