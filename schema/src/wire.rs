//! Just enough of the protobuf wire format to move a message between a typed v1 alias and a
//! `google.protobuf.Any` without naming its type: a v1 alias field (`ppu.v1.Step.furnace`) and
//! the family's own message (`ppu.devices.furnace.v1.FurnaceProgram`) have identical bytes, so
//! conversion is re-tagging, whichever family it is.

use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

/// A length-delimited top-level field of an encoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LenField<'a> {
    pub number: u32,
    pub payload: &'a [u8],
}

/// The length-delimited top-level fields of `bytes`, in order; `None` if `bytes` is not a
/// well-formed message.
pub fn len_fields(bytes: &[u8]) -> Option<Vec<LenField<'_>>> {
    let mut out = Vec::new();
    let mut buf = bytes;
    while buf.has_remaining() {
        let (number, wire) = decode_key(&mut buf).ok()?;
        match wire {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
            }
            WireType::SixtyFourBit => skip(&mut buf, 8)?,
            WireType::ThirtyTwoBit => skip(&mut buf, 4)?,
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                if buf.len() < len {
                    return None;
                }
                out.push(LenField {
                    number,
                    payload: &buf[..len],
                });
                buf = &buf[len..];
            }
            WireType::StartGroup | WireType::EndGroup => return None,
        }
    }
    Some(out)
}

fn skip(buf: &mut &[u8], n: usize) -> Option<()> {
    if buf.len() < n {
        return None;
    }
    buf.advance(n);
    Some(())
}

/// One length-delimited field `number` holding `payload`, encoded: decode it as the message
/// that has that field to get the field set.
pub fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    encode_key(number, WireType::LengthDelimited, &mut out);
    encode_varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// A varint field `number`, encoded.
pub fn varint_field(number: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    encode_key(number, WireType::Varint, &mut out);
    encode_varint(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_written_is_found_again() {
        let mut bytes = varint_field(1, 7);
        bytes.extend(len_field(12, b"abc"));
        bytes.extend(len_field(20, b""));
        let fields = len_fields(&bytes).expect("well formed");
        assert_eq!(
            fields,
            vec![
                LenField {
                    number: 12,
                    payload: b"abc"
                },
                LenField {
                    number: 20,
                    payload: b""
                }
            ]
        );
    }

    #[test]
    fn a_truncated_message_is_refused() {
        let bytes = len_field(12, b"abcdef");
        assert_eq!(len_fields(&bytes[..5]), None);
    }
}
