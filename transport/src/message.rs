//! A received message kept in the pieces it arrived in.

use bytes::Bytes;

/// One received request or response: the stream's bytes in order, held in the chunks the QUIC
/// stack delivered them in (about one per datagram), not copied into one buffer. Readers that
/// can walk the chunks (the worker's frame decoder) skip that copy, which for multi-MiB
/// messages costs as much as receiving them; [`Message::into_bytes`] joins them when one
/// buffer is needed.
#[derive(Clone, Debug, Default)]
pub struct Message {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Message {
    /// A message made of these chunks, in order (empty chunks are dropped).
    pub fn from_chunks(chunks: impl IntoIterator<Item = Bytes>) -> Message {
        let chunks: Vec<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let len = chunks.iter().map(Bytes::len).sum();
        Message { chunks, len }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its bytes, in order, as the non-empty chunks they arrived in.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Its bytes in order, across the chunks.
    fn bytes(&self) -> impl Iterator<Item = &u8> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The message in one buffer: free when it is one chunk, one copy otherwise.
    pub fn into_bytes(mut self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut joined = Vec::with_capacity(self.len);
                for chunk in &self.chunks {
                    joined.extend_from_slice(chunk);
                }
                joined.into()
            }
        }
    }
}

impl From<Bytes> for Message {
    fn from(bytes: Bytes) -> Message {
        Message::from_chunks([bytes])
    }
}

impl PartialEq for Message {
    /// Equal when the bytes are, however they are split.
    fn eq(&self, other: &Message) -> bool {
        self.len == other.len && self.bytes().eq(other.bytes())
    }
}

impl Eq for Message {}

impl PartialEq<Bytes> for Message {
    fn eq(&self, other: &Bytes) -> bool {
        self == &other[..]
    }
}

impl PartialEq<[u8]> for Message {
    fn eq(&self, other: &[u8]) -> bool {
        self.len == other.len() && self.bytes().eq(other.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(data: &[u8], at: &[usize]) -> Message {
        let mut chunks = Vec::new();
        let mut from = 0;
        for &to in at {
            chunks.push(Bytes::copy_from_slice(&data[from..to]));
            from = to;
        }
        chunks.push(Bytes::copy_from_slice(&data[from..]));
        Message::from_chunks(chunks)
    }

    #[test]
    fn joining_keeps_the_bytes_in_order_however_they_are_split() {
        let data: Vec<u8> = (0..100u8).collect();
        for at in [&[][..], &[0], &[1], &[50], &[3, 3, 60], &[99], &[100]] {
            let m = split(&data, at);
            assert_eq!(m.len(), 100);
            assert!(m.chunks().iter().all(|c| !c.is_empty()), "empty chunks are dropped");
            assert!(m == data[..]);
            assert!(m == split(&data, &[10, 20]));
            assert_eq!(&m.into_bytes()[..], &data[..]);
        }
        assert!(split(&data, &[50]) != split(&data[..99], &[50]));
        let mut other = data.clone();
        other[77] ^= 1;
        assert!(split(&data, &[50]) != other[..]);
    }

    #[test]
    fn one_chunk_is_handed_over_without_a_copy() {
        let bytes = Bytes::from(vec![7u8; 4096]);
        let ptr = bytes.as_ptr();
        assert_eq!(Message::from(bytes).into_bytes().as_ptr(), ptr);
        let empty = Message::from(Bytes::new());
        assert!(empty.is_empty() && empty.chunks().is_empty());
        assert!(empty.into_bytes().is_empty());
    }
}
