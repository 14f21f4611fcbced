//! Checkpoints in JetStream's object store.
//!
//! The layout is the object store's own (NATS ADR-20, what async-nats, nats.go and the `nats`
//! CLI read): an object's data is published in chunks to `$O.<bucket>.C.<nuid>`, then its
//! [`ObjectInfo`] (name, size, chunk count, `SHA-256=<base64url>` digest of the data) to
//! `$O.<bucket>.M.<base64url(name)>` with a `Nats-Rollup: sub` header. An object exists once
//! its info is stored: a half-uploaded one is never seen.
//!
//! [`Upload`] is written an archive as it is made (a [`crate::zipfmt::Sink`]): chunks of
//! 128 KiB, many published before the first is acknowledged rather than each waited on, the
//! object's SHA-256 computed on a thread of its own. Its info is
//! published once every chunk was acknowledged, under a name no object has, conditionally on
//! the name's subject being as it was seen (so an object is never replaced, even by another
//! worker choosing the same name). Dropped uncommitted, it purges its chunks. [`Fetch`] reads
//! an object as async-nats's `get` does (an ordered consumer of its chunk subject) but hands
//! the chunks on as they arrive, without copying them, to a blocking reader ([`Received`]),
//! which checks the size and SHA-256 (on another thread) before it sees the end.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

use async_nats::jetstream::{
    self,
    context::PublishErrorKind,
    object_store::{self, ObjectInfo, ObjectOptions},
    stream,
};
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::hashing::BytesHasher;

/// Largest chunk published (the server's `max_payload` may make it smaller). Larger chunks
/// cost nats-server more: measured here, 512 MiB in 1 MiB chunks took it 0.7 to 1.9 s of CPU
/// depending on how many were in flight, in 128 KiB chunks 0.65 to 0.8 s (tools/bench-migrate.sh).
pub const MAX_CHUNK: usize = 128 << 10;
/// The object metadata key under which an archive's stored entries of unknown size are
/// listed: `offset:size,...` (local header offset and size; see [`crate::zipfmt::Sink::commit`]).
pub const STORED_SIZES: &str = "cedana-stored-sizes";
/// The chunk header that announces the sizes of stored entries whose data descriptor starts in
/// that chunk (`offset:size,...`, as [`STORED_SIZES`]), so that an archive can be read front to
/// back while it is still being stored, before its info exists ([`Follow`]).
pub const SIZES_HEADER: &str = "Cedana-Stored-Sizes";
/// Chunks published and not yet acknowledged.
const IN_FLIGHT: usize = 64;
/// Chunks handed between threads at a time (fewer wake-ups than one by one).
const BATCH: usize = 8;
/// Batches made and not yet published.
const QUEUED: usize = 4;

/// The checkpoint bucket: its object store and the stream under it.
#[derive(Clone)]
pub struct Bucket {
    js: jetstream::Context,
    store: object_store::ObjectStore,
    stream: stream::Stream,
    name: String,
}

/// A name chosen for a new object, and the last sequence of its info subject when chosen (0:
/// no message), which the info's publish must still find.
struct FreeName {
    name: String,
    last_seq: u64,
}

impl Bucket {
    /// The bucket `name` (whose store is `store`).
    pub async fn open(
        js: &jetstream::Context,
        store: object_store::ObjectStore,
        name: &str,
    ) -> Result<Self, String> {
        let stream = js
            .get_stream(format!("OBJ_{name}"))
            .await
            .map_err(|e| format!("cannot open the stream of object store {name}: {e}"))?;
        Ok(Bucket {
            js: js.clone(),
            store,
            stream,
            name: name.to_string(),
        })
    }

    /// The object store.
    pub fn store(&self) -> &object_store::ObjectStore {
        &self.store
    }

    fn info_subject(&self, object: &str) -> String {
        cedana_protocol::object_info_subject(&self.name, &URL_SAFE.encode(object))
    }

    /// `<prefix>/<file_name>`, or `<prefix>/<stem>_N.zip` when that object exists (and is not
    /// deleted).
    async fn free_name(&self, prefix: &str, file_name: &str, skip: usize) -> FreeName {
        let stem = file_name.strip_suffix(".zip").unwrap_or(file_name);
        let mut skipped = 0;
        for n in 0..1000 {
            let name = match n {
                0 => format!("{prefix}/{file_name}"),
                n => format!("{prefix}/{stem}_{n}.zip"),
            };
            let last_seq = match self
                .stream
                .get_last_raw_message_by_subject(&self.info_subject(&name))
                .await
            {
                Ok(m) => match serde_json::from_slice::<ObjectInfo>(&m.payload) {
                    Ok(info) if info.deleted => m.sequence,
                    _ => continue,
                },
                Err(_) => 0,
            };
            if skipped < skip {
                skipped += 1;
                continue;
            }
            return FreeName { name, last_seq };
        }
        FreeName {
            name: format!("{prefix}/{file_name}"),
            last_seq: 0,
        }
    }

    /// An upload of a new object named `<prefix>/<stem>.zip` (or `_N`) on commit; `naming` is
    /// held while the name is chosen and claimed. Its chunks go to `$O.<bucket>.C.<chunks>`
    /// (a new random id if `None`; a given one is purged first, so that a repeated attempt
    /// never adds to an earlier one's chunks). Must be called inside a tokio runtime; the
    /// upload is then written from a blocking thread. The receiver resolves once the upload
    /// was committed or, dropped uncommitted, its chunks purged.
    pub fn upload(
        &self,
        prefix: &str,
        naming: Arc<tokio::sync::Mutex<()>>,
        chunks: Option<String>,
    ) -> (Upload, oneshot::Receiver<()>) {
        let handle = tokio::runtime::Handle::current();
        let max_payload = self.js.client().server_info().max_payload;
        let chunk_size = match max_payload {
            0 => 128 << 10,
            m => m.min(MAX_CHUNK),
        };
        let purge = chunks.as_ref().map(|_| self.stream.clone());
        let nuid = chunks.unwrap_or_else(cedana_protocol::new_chunks_id);
        let subject = cedana_protocol::object_chunks_subject(&self.name, &nuid);
        let (tx, rx) = mpsc::channel(QUEUED);
        let publisher = handle.spawn(publish_chunks(self.js.clone(), purge, subject, rx));
        let (done_tx, done_rx) = oneshot::channel();
        (
            Upload {
                handle,
                bucket: self.clone(),
                prefix: prefix.to_string(),
                naming,
                nuid,
                chunk_size,
                chunk: Vec::with_capacity(chunk_size),
                batch: Vec::with_capacity(BATCH),
                notes: Vec::new(),
                notes_from: 0,
                tx: Some(tx),
                publisher: Some(publisher),
                hasher: Some(BytesHasher::new()),
                size: 0,
                chunks: 0,
                committed: false,
                done: Some(done_tx),
            },
            done_rx,
        )
    }
}

/// A chunk of an object: its bytes, and the sizes it announces ([`SIZES_HEADER`]).
pub struct Chunk {
    pub data: Bytes,
    pub sizes: Option<String>,
}

/// Publishes the chunks it receives in order, keeping up to [`IN_FLIGHT`] unacknowledged;
/// first purges `subject` from `purge` if given.
async fn publish_chunks(
    js: jetstream::Context,
    purge: Option<stream::Stream>,
    subject: String,
    mut rx: mpsc::Receiver<Vec<Chunk>>,
) -> Result<(), String> {
    if let Some(stream) = purge {
        stream
            .purge()
            .filter(&subject)
            .await
            .map_err(|e| format!("cannot clear {subject} before the upload: {e}"))?;
    }
    let mut acks = VecDeque::with_capacity(IN_FLIGHT);
    while let Some(batch) = rx.recv().await {
        for chunk in batch {
            let published = match chunk.sizes {
                None => js.publish(subject.clone(), chunk.data).await,
                Some(sizes) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(SIZES_HEADER, sizes.as_str());
                    js.publish_with_headers(subject.clone(), headers, chunk.data)
                        .await
                }
            };
            let ack = published.map_err(|e| format!("cannot publish a chunk: {e}"))?;
            acks.push_back(std::future::IntoFuture::into_future(ack));
            if acks.len() >= IN_FLIGHT {
                if let Some(ack) = acks.pop_front() {
                    ack.await
                        .map_err(|e| format!("a chunk was not stored: {e}"))?;
                }
            }
        }
    }
    while let Some(ack) = acks.pop_front() {
        ack.await
            .map_err(|e| format!("a chunk was not stored: {e}"))?;
    }
    Ok(())
}

/// A new object being written; see the module's documentation.
pub struct Upload {
    handle: tokio::runtime::Handle,
    bucket: Bucket,
    prefix: String,
    naming: Arc<tokio::sync::Mutex<()>>,
    nuid: String,
    chunk_size: usize,
    chunk: Vec<u8>,
    /// Chunks not yet handed to the publisher.
    batch: Vec<Chunk>,
    /// Stored entries' sizes not yet announced: they go with the first chunk sent that holds
    /// a byte written after the first of them (`chunk` held `notes_from` bytes then).
    notes: Vec<(u64, u64)>,
    notes_from: usize,
    tx: Option<mpsc::Sender<Vec<Chunk>>>,
    publisher: Option<tokio::task::JoinHandle<Result<(), String>>>,
    hasher: Option<BytesHasher>,
    size: u64,
    chunks: usize,
    committed: bool,
    done: Option<oneshot::Sender<()>>,
}

impl Upload {
    /// Hands the current chunk to the publisher.
    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(self.chunk_size));
        let fresh = full.len() > self.notes_from;
        self.send_chunk(Bytes::from(full), fresh)
    }

    /// Hands `b` to the publisher as a chunk (in batches); `fresh`: it holds bytes written
    /// after the pending notes, which it then announces.
    fn send_chunk(&mut self, b: Bytes, fresh: bool) -> io::Result<()> {
        self.size += b.len() as u64;
        self.chunks += 1;
        if let Some(h) = &mut self.hasher {
            h.hash(b.clone());
        }
        let sizes = match (self.notes.is_empty(), fresh) {
            (true, _) => None,
            (false, true) => Some(sizes_list(&std::mem::take(&mut self.notes))),
            (false, false) => {
                self.notes_from = 0;
                None
            }
        };
        self.batch.push(Chunk { data: b, sizes });
        if self.batch.len() >= BATCH {
            self.send_batch()?;
        }
        Ok(())
    }

    fn send_batch(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        let sent = match &self.tx {
            Some(tx) => tx.blocking_send(batch).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// Why the publisher stopped.
    fn failure(&mut self) -> io::Error {
        drop(self.tx.take());
        let reason = match self.publisher.take() {
            Some(p) => match self.handle.block_on(p) {
                Ok(Err(e)) => e,
                Ok(Ok(())) => "the upload ended early".into(),
                Err(e) => e.to_string(),
            },
            None => "the upload failed earlier".into(),
        };
        io::Error::other(reason)
    }

    /// Publishes the object's info under a free name; returns the name.
    async fn publish_info(
        &self,
        stem: &str,
        digest: [u8; 32],
        stored_sizes: String,
    ) -> io::Result<String> {
        let _turn = self.naming.lock().await;
        let file_name = format!("{stem}.zip");
        // A name another writer claims between our look and our publish is skipped.
        for skip in 0..10 {
            let free = self.bucket.free_name(&self.prefix, &file_name, skip).await;
            let info = ObjectInfo {
                name: free.name.clone(),
                description: None,
                metadata: match stored_sizes.is_empty() {
                    true => Default::default(),
                    false => [(STORED_SIZES.to_string(), stored_sizes.clone())].into(),
                },
                headers: None,
                options: Some(ObjectOptions {
                    link: None,
                    max_chunk_size: Some(self.chunk_size),
                }),
                bucket: self.bucket.name.clone(),
                nuid: self.nuid.clone(),
                size: self.size as usize,
                chunks: self.chunks,
                modified: Some(time::OffsetDateTime::now_utc()),
                digest: Some(format!("SHA-256={}", URL_SAFE.encode(digest))),
                deleted: false,
            };
            let payload = serde_json::to_vec(&info).map_err(io::Error::other)?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Rollup", "sub");
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                free.last_seq.to_string(),
            );
            let stored = async {
                self.bucket
                    .js
                    .publish_with_headers(
                        self.bucket.info_subject(&free.name),
                        headers,
                        payload.into(),
                    )
                    .await?
                    .await
            }
            .await;
            match stored {
                Ok(_) => return Ok(free.name),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    debug!(name = %free.name, "object name taken meanwhile; choosing another");
                }
                Err(e) => {
                    // Stored all the same (the acknowledgement was lost)?
                    return match self.bucket.store.info(&free.name).await {
                        Ok(i) if i.nuid == self.nuid && !i.deleted => Ok(free.name),
                        _ => Err(io::Error::other(format!(
                            "cannot store the info of object {}: {e}",
                            free.name
                        ))),
                    };
                }
            }
        }
        Err(io::Error::other(format!(
            "no free object name for {}/{file_name}",
            self.prefix
        )))
    }
}

impl Write for Upload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk_size - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        if self.chunk.len() == self.chunk_size {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl crate::zipfmt::Sink for Upload {
    fn write_bytes(&mut self, mut b: Bytes) -> io::Result<()> {
        // Whole chunks of a large piece go out as slices of it (no copy); the rest is gathered.
        if b.len() >= self.chunk_size {
            if !self.chunk.is_empty() {
                self.send()?;
            }
            while b.len() >= self.chunk_size {
                let chunk = b.split_to(self.chunk_size);
                self.send_chunk(chunk, true)?;
            }
        }
        self.write_all(&b)
    }

    fn copy_from(
        &mut self,
        src: &mut File,
        len: u64,
        mut crc: Option<&mut crc32fast::Hasher>,
    ) -> io::Result<u64> {
        let _ = nix::fcntl::posix_fadvise(
            &*src,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        );
        let mut done = 0u64;
        while done < len {
            // Read straight into the chunk being filled.
            let old = self.chunk.len();
            let want = (self.chunk_size - old).min((len - done) as usize);
            self.chunk.resize(old + want, 0);
            let n = loop {
                match src.read(&mut self.chunk[old..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.chunk.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.chunk.truncate(old + n);
            if n == 0 {
                break;
            }
            if let Some(c) = crc.as_deref_mut() {
                c.update(&self.chunk[old..]);
            }
            done += n as u64;
            if self.chunk.len() == self.chunk_size {
                self.send()?;
            }
        }
        Ok(done)
    }

    fn note_stored_size(&mut self, offset: u64, size: u64) {
        if self.notes.is_empty() {
            self.notes_from = self.chunk.len();
        }
        self.notes.push((offset, size));
    }

    fn commit(mut self: Box<Self>, stem: &str, stored_sizes: &[(u64, u64)]) -> io::Result<String> {
        if !self.chunk.is_empty() {
            self.send()?;
        }
        self.send_batch()?;
        drop(self.tx.take());
        if let Some(p) = self.publisher.take() {
            match self.handle.block_on(p) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(io::Error::other(e)),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        let digest = self
            .hasher
            .take()
            .map(BytesHasher::finish)
            .unwrap_or_default();
        let handle = self.handle.clone();
        let sizes = sizes_list(stored_sizes);
        let name = handle.block_on(self.publish_info(stem, digest, sizes))?;
        self.committed = true;
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        Ok(name)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        drop(self.tx.take());
        let publisher = self.publisher.take();
        let stream = self.bucket.stream.clone();
        let subject = cedana_protocol::object_chunks_subject(&self.bucket.name, &self.nuid);
        let done = self.done.take();
        self.handle.spawn(async move {
            if let Some(p) = publisher {
                let _ = p.await;
            }
            if let Err(e) = stream.purge().filter(&subject).await {
                warn!(error = %e, subject = %subject, "cannot purge the chunks of an abandoned upload");
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        });
    }
}

/// `offset:size,...`.
fn sizes_list(sizes: &[(u64, u64)]) -> String {
    sizes
        .iter()
        .map(|(offset, size)| format!("{offset}:{size}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The pairs of an `offset:size,...` list; `None` if any is unreadable.
fn parse_sizes(list: &str) -> Option<Vec<(u64, u64)>> {
    list.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (o, n) = p.split_once(':')?;
            Some((o.trim().parse().ok()?, n.trim().parse().ok()?))
        })
        .collect()
}

/// Receives an object's bytes from [`Fetch::pump`] or [`Follow::pump`] on a blocking thread,
/// with the stored entries' sizes its chunks announce. When made to (for a download), it
/// computes the object's SHA-256 on another thread as the bytes pass, and at the end size and
/// SHA-256 must be those of the object's info, or the end is an error.
pub struct Received {
    rx: mpsc::Receiver<io::Result<Vec<Chunk>>>,
    /// Chunks received and not yet read.
    ready: VecDeque<Bytes>,
    /// Sizes announced by the chunks received so far.
    sizes: std::collections::BTreeMap<u64, u64>,
    /// Whether the chunks are known to announce the sizes (the object is read while stored).
    announced: bool,
    check: Option<Check>,
}

/// What the bytes received must add up to: the info's size and SHA-256, known from the start
/// or (following an object as it is stored) once its info was handed over.
struct Check {
    name: String,
    size: u64,
    digest: Option<String>,
    later: Option<Arc<OnceLock<ObjectInfo>>>,
    seen: u64,
    hasher: BytesHasher,
}

impl Check {
    fn verify(mut self) -> io::Result<()> {
        if let Some(later) = self.later.take() {
            let info = later
                .get()
                .ok_or_else(|| io::Error::other(format!("{}: its info never came", self.name)))?;
            self.name = info.name.clone();
            self.size = info.size as u64;
            self.digest = info.digest.clone();
        }
        let name = &self.name;
        if self.seen != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{name} has {} bytes, its info says {}",
                    self.seen, self.size
                ),
            ));
        }
        let digest = self.hasher.finish();
        if let Some(want) = &self.digest {
            let ok = want
                .strip_prefix("SHA-256=")
                .map(|b| b.trim_end_matches('='))
                .and_then(|b| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(b)
                        .ok()
                })
                .is_some_and(|w| w == digest);
            if !ok {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{name} does not have the SHA-256 stored with it (wrong digest)"),
                ));
            }
        }
        Ok(())
    }
}

impl Received {
    fn new(
        rx: mpsc::Receiver<io::Result<Vec<Chunk>>>,
        announced: bool,
        check: Option<Check>,
    ) -> Self {
        Received {
            rx,
            ready: VecDeque::new(),
            sizes: Default::default(),
            announced,
            check,
        }
    }
}

impl crate::zipfmt::ChunkSource for Received {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        while self.ready.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(batch)) => {
                    for chunk in batch {
                        if let Some(list) = &chunk.sizes {
                            let pairs = parse_sizes(list).ok_or_else(|| {
                                io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("a chunk has an unreadable {SIZES_HEADER} header"),
                                )
                            })?;
                            self.sizes.extend(pairs);
                        }
                        if let Some(c) = &mut self.check {
                            c.seen += chunk.data.len() as u64;
                            c.hasher.hash(chunk.data.clone());
                        }
                        self.ready.push_back(chunk.data);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => {
                    return match self.check.take() {
                        Some(c) => c.verify().map(|()| None),
                        None => Ok(None),
                    }
                }
            }
        }
        Ok(self.ready.pop_front())
    }

    fn stored_size(&self, offset: u64) -> Option<u64> {
        self.sizes.get(&offset).copied()
    }

    fn announces_sizes(&self) -> bool {
        self.announced
    }
}

/// How long a read waits for the next chunk before it gives up.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// An object about to be read: its info, and where its chunks are.
pub struct Fetch {
    pub info: ObjectInfo,
    js: jetstream::Context,
    stream: stream::Stream,
    bucket: String,
}

impl Bucket {
    /// Looks `name` up for reading.
    pub async fn fetch(&self, name: &str) -> Result<Fetch, String> {
        let info = self
            .store
            .info(name)
            .await
            .map_err(|e| format!("cannot fetch {name}: {e}"))?;
        if info.deleted {
            return Err(format!("cannot fetch {name}: it was deleted"));
        }
        if info.options.as_ref().is_some_and(|o| o.link.is_some()) {
            return Err(format!(
                "cannot fetch {name}: it is a link, not a checkpoint"
            ));
        }
        Ok(Fetch {
            info,
            js: self.js.clone(),
            stream: self.stream.clone(),
            bucket: self.name.clone(),
        })
    }

    /// Reads the object whose chunks are `$O.<bucket>.C.<chunks>` while it is being stored.
    pub fn follow(&self, chunks: &str) -> Follow {
        Follow {
            js: self.js.clone(),
            stream: self.stream.clone(),
            bucket: self.name.clone(),
            nuid: chunks.to_string(),
            info: Default::default(),
        }
    }
}

impl Fetch {
    /// The sizes of stored entries its writer listed (see [`STORED_SIZES`]); none if the list
    /// is missing or unreadable.
    pub fn stored_sizes(&self) -> std::collections::BTreeMap<u64, u64> {
        self.info
            .metadata
            .get(STORED_SIZES)
            .and_then(|l| parse_sizes(l))
            .map(|pairs| pairs.into_iter().collect())
            .unwrap_or_default()
    }

    /// A channel for [`Fetch::pump`]. With `digest`, its receiving end computes the object's
    /// SHA-256 and sees the end only once size and SHA-256 are those of the info (a download);
    /// without, only the size is checked (by the pump), for a reader that verifies what it
    /// reads itself: an archive, each of whose entries has its CRC-32 and SHA-256 checked.
    pub fn channel(&self, digest: bool) -> (mpsc::Sender<io::Result<Vec<Chunk>>>, Received) {
        let (tx, rx) = mpsc::channel(8);
        let check = digest.then(|| Check {
            name: self.info.name.clone(),
            size: self.info.size as u64,
            digest: self.info.digest.clone(),
            later: None,
            seen: 0,
            hasher: BytesHasher::new(),
        });
        (tx, Received::new(rx, false, check))
    }

    /// Reads the object's chunks in order (an ordered consumer of its chunk subject, as
    /// async-nats's `get` does) and sends them to `tx` (from [`Fetch::channel`]) as they
    /// come, without copying them; then closes it, which the receiving end takes as the end.
    /// A failure is sent to it (and returned). Stops early, without error, when the receiver
    /// is gone. Returns the bytes sent.
    pub async fn pump(self, tx: mpsc::Sender<io::Result<Vec<Chunk>>>) -> io::Result<u64> {
        let (nuid, label) = (self.info.nuid.clone(), self.info.name.clone());
        let from = (&self.js, &self.stream, self.bucket.as_str(), nuid.as_str());
        read_chunks(from, &label, Some(self.info), None, &tx).await
    }
}

/// An object read while another worker stores it: its chunks are read as they are published,
/// the stored entries' sizes coming with them ([`SIZES_HEADER`]); how many chunks there are is
/// known once the object's info is handed over (the object committed).
pub struct Follow {
    js: jetstream::Context,
    stream: stream::Stream,
    bucket: String,
    nuid: String,
    /// The info once handed over, for the receiving end's check.
    info: Arc<OnceLock<ObjectInfo>>,
}

impl Follow {
    /// A channel for [`Follow::pump`], `digest` as for [`Fetch::channel`] (the info handed
    /// over is what the bytes must match).
    pub fn channel(&self, digest: bool) -> (mpsc::Sender<io::Result<Vec<Chunk>>>, Received) {
        let (tx, rx) = mpsc::channel(8);
        let check = digest.then(|| Check {
            name: format!("the checkpoint with chunks {}", self.nuid),
            size: 0,
            digest: None,
            later: Some(self.info.clone()),
            seen: 0,
            hasher: BytesHasher::new(),
        });
        (tx, Received::new(rx, true, check))
    }

    /// Like [`Fetch::pump`], the info of the object coming from `info` once it was stored: it
    /// must be the object of these chunks, and is what says where they end. Gives up when
    /// `info` is dropped, or when neither a chunk nor the info came for [`IDLE`].
    pub async fn pump(
        self,
        info: oneshot::Receiver<ObjectInfo>,
        tx: mpsc::Sender<io::Result<Vec<Chunk>>>,
    ) -> io::Result<u64> {
        let label = format!("the checkpoint with chunks {}", self.nuid);
        let from = (
            &self.js,
            &self.stream,
            self.bucket.as_str(),
            self.nuid.as_str(),
        );
        read_chunks(from, &label, None, Some((info, &*self.info)), &tx).await
    }
}

/// Where chunks are read from: the context, the bucket's stream, its name, the chunks' id.
type ChunksOf<'a> = (&'a jetstream::Context, &'a stream::Stream, &'a str, &'a str);
/// An object's info handed over later, and the cell where it is kept for the receiving end.
type InfoLater<'a> = (oneshot::Receiver<ObjectInfo>, &'a OnceLock<ObjectInfo>);

/// Reads the chunks `from` in order and sends them to `tx` a few at a time, until as many as
/// `info` counts (given, or received from `later`) were sent; their bytes must then add up to
/// its size. A failure is sent to `tx` too.
async fn read_chunks(
    from: ChunksOf<'_>,
    label: &str,
    info: Option<ObjectInfo>,
    later: Option<InfoLater<'_>>,
    tx: &mpsc::Sender<io::Result<Vec<Chunk>>>,
) -> io::Result<u64> {
    let result = read_chunks_into(from, label, info, later, tx).await;
    if let Err(e) = &result {
        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string()))).await;
    }
    result
}

async fn read_chunks_into(
    (js, stream, bucket, nuid): ChunksOf<'_>,
    label: &str,
    mut info: Option<ObjectInfo>,
    mut later: Option<InfoLater<'_>>,
    tx: &mpsc::Sender<io::Result<Vec<Chunk>>>,
) -> io::Result<u64> {
    let subject = cedana_protocol::object_chunks_subject(bucket, nuid);
    if info.as_ref().is_some_and(|i| i.chunks == 0) {
        return Ok(0);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: subject,
            ..Default::default()
        })
        .await
        .map_err(|e| io::Error::other(format!("cannot read {label}: {e}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| io::Error::other(format!("cannot read {label}: {e}")))?;
    let (mut total, mut got) = (0u64, 0usize);
    loop {
        let wanted = info.as_ref().map(|i| i.chunks);
        if wanted.is_some_and(|n| got >= n) {
            break;
        }
        let waiting_for_info = info.is_none();
        let first = tokio::select! {
            i = async { (&mut later.as_mut().expect("waiting for the info").0).await }, if waiting_for_info => {
                let i = i.map_err(|_| io::Error::other(format!(
                    "{label}: no restore asked for it; reading stopped"
                )))?;
                if i.nuid != nuid {
                    return Err(io::Error::other(format!(
                        "{} is not {label} (its chunks are {})", i.name, i.nuid
                    )));
                }
                if let Some((_, cell)) = &later {
                    let _ = cell.set(i.clone());
                }
                info = Some(i);
                continue;
            }
            m = tokio::time::timeout(IDLE, messages.next()) => match m {
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no chunk of {label} arrived for {} s", IDLE.as_secs()),
                    ))
                }
                Ok(m) => m,
            },
        };
        // Handed on a few at a time: this one and those that arrived with it.
        let mut batch = Vec::with_capacity(BATCH);
        let mut next = Some(first);
        while let Some(m) = next.take() {
            let m = match m {
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the chunks of {label} ended early"),
                    ))
                }
                Some(Err(e)) => return Err(io::Error::other(format!("cannot read {label}: {e}"))),
                Some(Ok(m)) => m,
            };
            let sizes = m
                .message
                .headers
                .as_ref()
                .and_then(|h| h.get(SIZES_HEADER))
                .map(|v| v.as_str().to_string());
            let data = m.message.payload.clone();
            total += data.len() as u64;
            batch.push(Chunk { data, sizes });
            got += 1;
            let more = info.as_ref().is_none_or(|i| got < i.chunks);
            if more && batch.len() < BATCH {
                next = messages.next().now_or_never();
            }
        }
        if tx.send(Ok(batch)).await.is_err() {
            return Ok(total);
        }
    }
    let info = info.expect("known at the end");
    if total != info.size as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{label} has {total} bytes, its info says {}", info.size),
        ));
    }
    Ok(total)
}

/// Downloads an object into `file` (4 MiB writes on a blocking thread), its size and SHA-256
/// checked.
pub async fn download(fetch: Fetch, file: File) -> io::Result<u64> {
    let (tx, mut rx) = fetch.channel(true);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        use crate::zipfmt::ChunkSource;
        let mut out = io::BufWriter::with_capacity(4 << 20, file);
        while let Some(b) = rx.next_chunk()? {
            out.write_all(&b)?;
        }
        out.flush()
    });
    let pumped = fetch.pump(tx).await;
    let written = writer.await.map_err(io::Error::other)?;
    let n = pumped?;
    written?;
    Ok(n)
}
