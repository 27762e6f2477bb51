//! Decoding an upstream's body as it streams in: its `Content-Encoding` (gzip, deflate, br,
//! zstd or none) undone chunk by chunk into a buffer that refuses to grow past a bound of
//! DECODED bytes, so a small compressed body that inflates to gigabytes stops at the bound
//! instead of being inflated whole.

use std::io::{self, Write};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;

/// The largest zstd window accepted: 8 MiB, the most RFC 8878 lets an HTTP encoder use. A frame
/// may ask for up to 2 GiB, and the window is allocated before any byte is decoded.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Bytes of decoded output a brotli decoder gathers before writing them to the sink.
const BROTLI_BUFFER: usize = 16 * 1024;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("body is over the bound of {limit} bytes{}", decoded(*.encoding))]
    OverLimit {
        limit: usize,
        encoding: Option<&'static str>,
    },
    #[error("body has a Content-Encoding that is not supported: `{0}`")]
    Unsupported(String),
    #[error("body is not valid {encoding}: {source}")]
    Corrupt {
        encoding: &'static str,
        source: io::Error,
    },
}

fn decoded(encoding: Option<&'static str>) -> String {
    encoding.map_or_else(String::new, |e| format!(" once decoded ({e})"))
}

/// One body's decoder: feed it the body's chunks with `push`, then `finish`.
pub struct BodyDecoder {
    coding: Coding,
    limit: usize,
}

enum Coding {
    Identity(Sink),
    Gzip(flate2::write::MultiGzDecoder<Sink>),
    /// `deflate` until its first two bytes (kept here) show whether it is zlib-wrapped, as
    /// RFC 9110 says, or raw, as some servers send it.
    DeflateStart(Sink, Vec<u8>),
    Zlib(flate2::write::ZlibDecoder<Sink>),
    RawDeflate(flate2::write::DeflateDecoder<Sink>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Sink>>),
    Zstd(zstd::stream::write::Decoder<'static, Sink>),
}

impl BodyDecoder {
    /// A decoder for a body with this `Content-Encoding`, holding at most `limit` decoded
    /// bytes. An encoding it does not know is refused, never passed on undecoded.
    pub fn new(content_encoding: Option<&HeaderValue>, limit: usize) -> Result<Self, DecodeError> {
        let sink = Sink {
            body: BytesMut::new(),
            limit,
        };
        let name = match content_encoding {
            None => String::new(),
            Some(value) => String::from_utf8_lossy(value.as_bytes())
                .trim()
                .to_ascii_lowercase(),
        };
        let coding = match name.as_str() {
            "" | "identity" => Coding::Identity(sink),
            "gzip" | "x-gzip" => Coding::Gzip(flate2::write::MultiGzDecoder::new(sink)),
            "deflate" => Coding::DeflateStart(sink, Vec::new()),
            "br" => Coding::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(
                sink,
                BROTLI_BUFFER,
            ))),
            "zstd" => {
                let corrupt = |source| DecodeError::Corrupt {
                    encoding: "zstd",
                    source,
                };
                let mut decoder = zstd::stream::write::Decoder::new(sink).map_err(corrupt)?;
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(corrupt)?;
                Coding::Zstd(decoder)
            }
            // Stacked codings (`gzip, br`) are legal but no upstream of ours sends them.
            _ => return Err(DecodeError::Unsupported(name)),
        };
        Ok(BodyDecoder { coding, limit })
    }

    /// Decodes one chunk of the body. Stops, with `OverLimit`, as soon as the decoded bytes
    /// pass the bound: each decoder writes its output in pieces of at most a few dozen KiB,
    /// and the sink refuses the first piece that does not fit, so the work done on a chunk is
    /// bounded by the bound whatever the chunk inflates to.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        if let Coding::DeflateStart(_, start) = &mut self.coding {
            start.extend_from_slice(chunk);
            if start.len() < 2 {
                return Ok(());
            }
            let start = self.choose_deflate();
            return self.write(&start);
        }
        self.write(chunk)
    }

    /// The end of the body: flushes what the decoder still holds and returns the decoded body.
    pub fn finish(mut self) -> Result<Bytes, DecodeError> {
        if let Coding::DeflateStart(..) = self.coding {
            // Fewer than two bytes cannot be a valid deflate body; the decoder decides.
            let start = self.choose_deflate();
            self.write(&start)?;
        }
        let encoding = self.encoding();
        let limit = self.limit;
        let finished = match self.coding {
            Coding::Identity(sink) | Coding::DeflateStart(sink, _) => Ok(sink),
            Coding::Gzip(decoder) => decoder.finish(),
            Coding::Zlib(decoder) => decoder.finish(),
            Coding::RawDeflate(decoder) => decoder.finish(),
            Coding::Brotli(mut decoder) => decoder.close().and_then(|()| {
                decoder.into_inner().map_err(|_| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the stream is truncated")
                })
            }),
            Coding::Zstd(decoder) => decoder.finish(),
        };
        finished
            .map(|sink| sink.body.freeze())
            .map_err(|source| classify(source, encoding, limit))
    }

    fn write(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        let written = match &mut self.coding {
            Coding::Identity(sink) | Coding::DeflateStart(sink, _) => sink.write_all(data),
            Coding::Gzip(decoder) => decoder.write_all(data),
            Coding::Zlib(decoder) => decoder.write_all(data),
            Coding::RawDeflate(decoder) => decoder.write_all(data),
            Coding::Brotli(decoder) => decoder.write_all(data),
            Coding::Zstd(decoder) => decoder.write_all(data),
        };
        written.map_err(|source| classify(source, self.encoding(), self.limit))
    }

    /// Leaves `DeflateStart` for zlib or raw deflate, chosen by the first two bytes (RFC 1950:
    /// compression method 8 and a header check that is a multiple of 31), and returns the
    /// bytes held so far, still to be decoded.
    fn choose_deflate(&mut self) -> Vec<u8> {
        let Coding::DeflateStart(sink, start) = &mut self.coding else {
            return Vec::new();
        };
        let start = std::mem::take(start);
        let sink = std::mem::replace(
            sink,
            Sink {
                body: BytesMut::new(),
                limit: 0,
            },
        );
        let zlib = match start.as_slice() {
            [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
            _ => true,
        };
        self.coding = if zlib {
            Coding::Zlib(flate2::write::ZlibDecoder::new(sink))
        } else {
            Coding::RawDeflate(flate2::write::DeflateDecoder::new(sink))
        };
        start
    }

    fn encoding(&self) -> Option<&'static str> {
        match &self.coding {
            Coding::Identity(_) => None,
            Coding::Gzip(_) => Some("gzip"),
            Coding::DeflateStart(..) | Coding::Zlib(_) | Coding::RawDeflate(_) => Some("deflate"),
            Coding::Brotli(_) => Some("br"),
            Coding::Zstd(_) => Some("zstd"),
        }
    }
}

/// Tells the sink's refusal (the bound was passed) from the decoder's own errors.
fn classify(source: io::Error, encoding: Option<&'static str>, limit: usize) -> DecodeError {
    if source.get_ref().is_some_and(|e| e.is::<OverLimit>()) {
        DecodeError::OverLimit { limit, encoding }
    } else {
        DecodeError::Corrupt {
            encoding: encoding.unwrap_or("identity"),
            source,
        }
    }
}

/// Where decoded bytes go; it refuses a write that would take it past `limit`.
struct Sink {
    body: BytesMut,
    limit: usize,
}

/// The error the sink refuses a write with.
#[derive(Debug)]
struct OverLimit;

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the decoded body is over its bound")
    }
}

impl std::error::Error for OverLimit {}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.body.len() + data.len() > self.limit {
            return Err(io::Error::other(OverLimit));
        }
        self.body.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn decode(encoding: &'static str, body: &[u8]) -> Result<Bytes, DecodeError> {
        let value = HeaderValue::from_static(encoding);
        let mut decoder = BodyDecoder::new(Some(&value), LIMIT)?;
        // Small chunks, as a slow upstream would send them.
        for chunk in body.chunks(7) {
            decoder.push(chunk)?;
        }
        decoder.finish()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn brotli(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            e.write_all(data).unwrap();
        }
        out
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::encode_all(data, 3).unwrap()
    }

    #[test]
    fn every_encoding_round_trips() {
        let json = br#"{"user":{"id":7,"name":"Ada"},"items":[1,2,3]}"#.repeat(50);
        let cases: [(&'static str, Vec<u8>); 7] = [
            ("identity", json.clone()),
            ("gzip", gzip(&json)),
            ("x-gzip", gzip(&json)),
            ("deflate", zlib(&json)),
            ("deflate", raw_deflate(&json)),
            ("br", brotli(&json)),
            ("zstd", zstd(&json)),
        ];
        for (encoding, body) in cases {
            let decoded = decode(encoding, &body).unwrap_or_else(|e| panic!("{encoding}: {e}"));
            assert_eq!(&decoded[..], &json[..], "{encoding}");
        }
        let mut none = BodyDecoder::new(None, LIMIT).unwrap();
        none.push(&json).unwrap();
        assert_eq!(&none.finish().unwrap()[..], &json[..]);
    }

    #[test]
    fn a_bomb_stops_at_the_bound_in_every_encoding() {
        // 64 MiB of zeros: each encoding shrinks it to a few KiB at most.
        let zeros = vec![0u8; 64 << 20];
        let cases: [(&'static str, Vec<u8>); 5] = [
            ("gzip", gzip(&zeros)),
            ("deflate", zlib(&zeros)),
            ("deflate", raw_deflate(&zeros)),
            ("br", brotli(&zeros)),
            ("zstd", zstd(&zeros)),
        ];
        drop(zeros);
        for (encoding, body) in cases {
            let value = HeaderValue::from_static(encoding);
            let mut decoder = BodyDecoder::new(Some(&value), LIMIT).unwrap();
            // One push of the whole body: the case Pingora's codec inflated in one call.
            let error = decoder
                .push(&body)
                .err()
                .unwrap_or_else(|| panic!("{encoding} passed"));
            assert!(
                matches!(error, DecodeError::OverLimit { limit: LIMIT, .. }),
                "{encoding}: {error}"
            );
            assert!(error.to_string().contains("once decoded"), "{error}");
        }
    }

    #[test]
    fn the_bound_counts_plain_bodies_and_the_final_flush() {
        let mut plain = BodyDecoder::new(None, 10).unwrap();
        plain.push(b"0123456789").unwrap();
        assert!(matches!(
            plain.push(b"x"),
            Err(DecodeError::OverLimit { .. })
        ));
        // Exactly at the bound passes, one byte more does not, however it is split.
        for (size, passes) in [(LIMIT, true), (LIMIT + 1, false)] {
            let body = gzip(&vec![b'a'; size]);
            let result = decode("gzip", &body);
            assert_eq!(result.is_ok(), passes, "{size}: {:?}", result.err());
        }
    }

    #[test]
    fn a_zstd_frame_asking_for_a_window_over_8_mib_is_refused() {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(27).unwrap();
        encoder.write_all(b"{}").unwrap();
        let body = encoder.finish().unwrap();
        let error = decode("zstd", &body).unwrap_err();
        assert!(
            matches!(
                error,
                DecodeError::Corrupt {
                    encoding: "zstd",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn unknown_and_corrupt_bodies_are_refused() {
        let value = HeaderValue::from_static("compress");
        assert!(matches!(
            BodyDecoder::new(Some(&value), LIMIT),
            Err(DecodeError::Unsupported(name)) if name == "compress"
        ));
        for encoding in ["gzip", "br", "zstd"] {
            let error = decode(encoding, b"this is not compressed at all").unwrap_err();
            assert!(
                matches!(error, DecodeError::Corrupt { .. }),
                "{encoding}: {error}"
            );
        }
    }
}
