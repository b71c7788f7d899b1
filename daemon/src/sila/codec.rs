//! The gRPC codec of the SiLA endpoint: requests decode into dynamic messages of the method's
//! input type (known only at run time: the features are generated), replies go out as the
//! bytes a handler encoded.

use ppu_schema::prost_reflect::{DynamicMessage, MessageDescriptor};
use prost::bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Decodes `input` messages; encodes already-encoded replies.
#[derive(Debug, Clone)]
pub(crate) struct DynCodec {
    input: MessageDescriptor,
}

impl DynCodec {
    pub(crate) fn new(input: MessageDescriptor) -> DynCodec {
        DynCodec { input }
    }
}

impl Codec for DynCodec {
    type Encode = Vec<u8>;
    type Decode = DynamicMessage;
    type Encoder = BytesEncoder;
    type Decoder = DynDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> DynDecoder {
        DynDecoder(self.input.clone())
    }
}

#[derive(Debug)]
pub(crate) struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct DynDecoder(MessageDescriptor);

impl Decoder for DynDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "undecodable request: not a {}: {e}",
                    self.0.full_name()
                ))
            })
    }
}
