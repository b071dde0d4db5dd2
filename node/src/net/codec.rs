//! Request-response framing for Tern protocols: a 4-byte big-endian length,
//! then one versioned [`Record`]. The length is checked against the record
//! type's bound before any buffer is allocated.

use std::{io, marker::PhantomData};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{StreamProtocol, request_response};
use prometheus_client::metrics::counter::Counter;
use tern_protocol::Record;

/// Frames one record type each way. Frames it refuses (oversized, truncated,
/// undecodable, failing validation) are counted in `rejected` and logged:
/// libp2p's request-response drops such streams without reporting them.
pub struct RecordCodec<Req, Resp> {
    rejected: Counter,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> RecordCodec<Req, Resp> {
    pub fn new(rejected: Counter) -> Self {
        Self {
            rejected,
            _types: PhantomData,
        }
    }

    async fn read<R: Record, T: AsyncRead + Unpin + Send>(
        &self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<R> {
        let result = read_frame(io).await;
        if let Err(e) = &result
            && matches!(
                e.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            )
        {
            self.rejected.inc();
            tracing::warn!(%protocol, "rejected a malformed frame: {e}");
        }
        result
    }
}

impl<Req, Resp> Clone for RecordCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.rejected.clone())
    }
}

pub async fn read_frame<R: Record, T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<R> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > R::MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {} allowed", R::MAX_LEN),
        ));
    }
    let mut buf = frame_buffer(len);
    let read = io.read_exact(&mut buf).await;
    let decoded = read
        .and_then(|()| R::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)));
    recycle(buf);
    decoded
}

/// Frames at least this large are read into recycled buffers.
const RECYCLE_MIN: usize = 64 * 1024;
/// Buffers kept for reuse (one per frame being read at once, about).
const RECYCLED: usize = 8;
/// Largest buffer kept.
const RECYCLE_MAX: usize = 2 << 20;

/// Large frames' buffers, kept between reads: a fresh megabyte costs 256
/// page faults and the kernel's zeroing of every page, which was a tenth of
/// a catching-up storage peer's time.
static BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A buffer of `len` bytes for a frame to be read into whole (`len` is
/// bounded by the caller). A recycled one keeps the bytes of its last frame
/// where the new one will overwrite them: only bytes beyond those are
/// zeroed.
fn frame_buffer(len: usize) -> Vec<u8> {
    let recycled = match len >= RECYCLE_MIN {
        true => BUFFERS.lock().ok().and_then(|mut b| b.pop()),
        false => None,
    };
    let mut buf = recycled.unwrap_or_default();
    buf.resize(len, 0);
    buf
}

fn recycle(buf: Vec<u8>) {
    if buf.capacity() < RECYCLE_MIN || buf.capacity() > RECYCLE_MAX {
        return;
    }
    if let Ok(mut kept) = BUFFERS.lock()
        && kept.len() < RECYCLED
    {
        kept.push(buf);
    }
}

pub async fn write_frame<R: Record, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    record: &R,
) -> io::Result<()> {
    let bytes = record.encode();
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> request_response::Codec for RecordCodec<Req, Resp>
where
    Req: Record + Send + Sync + 'static,
    Resp: Record + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(protocol, io).await
    }

    async fn read_response<T>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(protocol, io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use tern_protocol::{AccountKeypair, DeviceCertificate, DevicePublicKey};

    fn cert() -> DeviceCertificate {
        let device = DevicePublicKey::from_bytes(
            *AccountKeypair::from_secret_bytes(&[2; 32]).id().as_bytes(),
        )
        .unwrap();
        AccountKeypair::from_secret_bytes(&[1; 32])
            .certify(device, "n", 1)
            .unwrap()
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Cursor::new(Vec::new());
        write_frame(&mut buf, &cert()).await.unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(
            read_frame::<DeviceCertificate, _>(&mut rd).await.unwrap(),
            cert()
        );
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Blob(Vec<u8>);

    impl Record for Blob {
        const VERSION: u8 = 1;
        const MAX_LEN: usize = 1 << 20;
    }

    /// Large frames reuse buffers: each still reads exactly its own bytes,
    /// after larger and smaller ones and after one that broke off.
    #[tokio::test]
    async fn large_frames_in_a_row_read_their_own_bytes() {
        let blobs: Vec<Blob> = [(300_000, 1u8), (70_000, 2), (500_000, 3), (65_536, 4)]
            .iter()
            .map(|&(len, fill)| Blob(vec![fill; len]))
            .collect();
        let mut buf = Cursor::new(Vec::new());
        for b in &blobs {
            write_frame(&mut buf, b).await.unwrap();
        }
        let bytes = buf.into_inner();
        let mut rd = Cursor::new(bytes.clone());
        for b in &blobs {
            assert_eq!(&read_frame::<Blob, _>(&mut rd).await.unwrap(), b);
        }
        // A frame cut short is an error; the next stream's frames are whole.
        let mut cut = Cursor::new(bytes[..200_000].to_vec());
        let err = read_frame::<Blob, _>(&mut cut).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut rd = Cursor::new(bytes);
        for b in &blobs {
            assert_eq!(&read_frame::<Blob, _>(&mut rd).await.unwrap(), b);
        }
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocation() {
        let mut rd = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        let err = read_frame::<DeviceCertificate, _>(&mut rd)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let mut buf = Cursor::new(Vec::new());
        write_frame(&mut buf, &cert()).await.unwrap();
        let bytes = buf.into_inner();
        for cut in 0..bytes.len() {
            let mut rd = Cursor::new(bytes[..cut].to_vec());
            assert!(read_frame::<DeviceCertificate, _>(&mut rd).await.is_err());
        }
        let mut garbage = 20u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xAB; 20]);
        assert!(
            read_frame::<DeviceCertificate, _>(&mut Cursor::new(garbage))
                .await
                .is_err()
        );
    }
}
