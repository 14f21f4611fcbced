//! The store's whole cycle on a folder store: upload, incremental upload, download, damage,
//! prune (and a prune meeting a checkpoint being written).

use std::path::Path;

use cedana_store::{
    download, gc, prune, upload, Keep, Piece, Store, StoreError, StoreUrl, Wanted, Writing,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Pseudo-random bytes (xorshift), `n` of them, from `seed`.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn manifest(entries: &[cedana_store::UploadedEntry]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "entries": entries })).unwrap()
}

fn wanted(entries: &[cedana_store::UploadedEntry]) -> Vec<Wanted> {
    entries
        .iter()
        .map(|e| Wanted {
            path: e.name.clone().into(),
            size: e.size,
            chunks: e.chunks.clone(),
        })
        .collect()
}

fn chunk_files(root: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(root.join("chunks"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A folder store under `dir` (`store/`) and a folder for the files to upload (`src/`).
fn folder_store(dir: &Path) -> (std::path::PathBuf, Store, std::path::PathBuf) {
    let root = dir.join("store");
    let store = Store::open(&StoreUrl::parse(root.to_str().unwrap()).unwrap()).unwrap();
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    (root, store, src)
}

#[test]
fn a_second_checkpoint_sends_only_what_changed_and_prune_keeps_what_is_named() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let (root, store, src) = folder_store(dir.path());
    // 8 MiB of noise and a small file.
    let mut big = noise(1, 8 << 20);
    std::fs::write(src.join("pages-1.img"), &big).unwrap();
    std::fs::write(src.join("core-1.img"), b"core").unwrap();
    let pieces = vec![
        Piece {
            name: "images/pages-1.img".into(),
            path: src.join("pages-1.img"),
            cuts: vec![],
            first: None,
        },
        Piece {
            name: "images/core-1.img".into(),
            path: src.join("core-1.img"),
            cuts: vec![],
            first: None,
        },
    ];
    let first = rt.block_on(async {
        let mut w = Writing::begin(&store).await.unwrap();
        let up = upload(&w, &pieces, 1, None).await.unwrap();
        w.commit("one", manifest(&up.entries)).await.unwrap();
        up
    });
    assert_eq!(first.chunks, 9);
    assert_eq!(first.chunks_sent, 9);
    assert_eq!(first.raw_sent, (8 << 20) + 4);
    // One MiB rewritten: one chunk sent.
    big[3 << 20..4 << 20].copy_from_slice(&noise(2, 1 << 20));
    std::fs::write(src.join("pages-1.img"), &big).unwrap();
    let second = rt.block_on(async {
        let mut w = Writing::begin(&store).await.unwrap();
        let up = upload(&w, &pieces, 1, None).await.unwrap();
        w.commit("two", manifest(&up.entries)).await.unwrap();
        up
    });
    assert_eq!(second.chunks_sent, 1);
    assert_eq!(second.raw_sent, 1 << 20);
    assert_eq!(chunk_files(&root).len(), 10);
    // A name is never written twice.
    let again = rt.block_on(async {
        let mut w = Writing::begin(&store).await.unwrap();
        w.commit("two", manifest(&second.entries)).await
    });
    assert!(matches!(again, Err(StoreError::Exists { .. })), "{again:?}");

    // Both come back whole.
    for (name, up, want) in [
        ("one", &first, noise(1, 8 << 20)),
        ("two", &second, big.clone()),
    ] {
        let out = dir.path().join(format!("out-{name}"));
        std::fs::create_dir(&out).unwrap();
        rt.block_on(download(&store, name, &wanted(&up.entries), &out, None))
            .unwrap();
        assert_eq!(std::fs::read(out.join("images/pages-1.img")).unwrap(), want);
        assert_eq!(
            std::fs::read(out.join("images/core-1.img")).unwrap(),
            b"core"
        );
    }

    // Keeping the newest: the chunk only "one" named goes, everything "two" names stays.
    let pruned = rt
        .block_on(prune(
            &store,
            &Keep {
                newest: 1,
                ..Default::default()
            },
        ))
        .unwrap();
    assert_eq!(pruned.removed, vec!["one".to_string()]);
    assert_eq!(pruned.chunks_removed, 1, "{pruned:?}");
    assert_eq!(chunk_files(&root).len(), 9);
    let out = dir.path().join("out-after-prune");
    std::fs::create_dir(&out).unwrap();
    rt.block_on(download(
        &store,
        "two",
        &wanted(&second.entries),
        &out,
        None,
    ))
    .unwrap();
    assert_eq!(std::fs::read(out.join("images/pages-1.img")).unwrap(), big);
}

#[test]
fn a_damaged_or_missing_chunk_is_named_and_the_previous_checkpoint_still_restores() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store =
        Store::open(&StoreUrl::parse(&format!("file://{}", root.display())).unwrap()).unwrap();
    let src = dir.path().join("a.img");
    std::fs::write(&src, noise(5, 3 << 20)).unwrap();
    let pieces = vec![Piece {
        name: "a.img".into(),
        path: src.clone(),
        cuts: vec![],
        first: None,
    }];
    let old = rt.block_on(async {
        let mut w = Writing::begin(&store).await.unwrap();
        let up = upload(&w, &pieces, 1, None).await.unwrap();
        w.commit("old", manifest(&up.entries)).await.unwrap();
        up
    });
    std::fs::write(&src, noise(6, 3 << 20)).unwrap();
    let new = rt.block_on(async {
        let mut w = Writing::begin(&store).await.unwrap();
        let up = upload(&w, &pieces, 1, None).await.unwrap();
        w.commit("new", manifest(&up.entries)).await.unwrap();
        up
    });
    // One of the new checkpoint's chunks altered (another chunk's bytes under its name), one
    // removed.
    let c0 = new.entries[0].chunks[0].id.to_string();
    let c1 = new.entries[0].chunks[1].id.to_string();
    let o0 = old.entries[0].chunks[0].id.to_string();
    std::fs::copy(root.join("chunks").join(&o0), root.join("chunks").join(&c0)).unwrap();
    let out = dir.path().join("o1");
    std::fs::create_dir(&out).unwrap();
    let e = rt
        .block_on(download(&store, "new", &wanted(&new.entries), &out, None))
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::BadChunk { .. } | StoreError::MissingChunk { .. }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("\"new\""), "{text}");
    std::fs::remove_file(root.join("chunks").join(&c1)).unwrap();
    std::fs::copy(root.join("chunks").join(&o0), root.join("chunks").join(&c0)).unwrap();
    let out = dir.path().join("o2");
    std::fs::create_dir(&out).unwrap();
    let e = rt
        .block_on(download(&store, "new", &wanted(&new.entries), &out, None))
        .unwrap_err();
    assert!(
        e.to_string().contains(&c0) || e.to_string().contains(&c1),
        "{e}"
    );
    // The old one is untouched by all that.
    let out = dir.path().join("o3");
    std::fs::create_dir(&out).unwrap();
    rt.block_on(download(&store, "old", &wanted(&old.entries), &out, None))
        .unwrap();
    assert_eq!(std::fs::read(out.join("a.img")).unwrap(), noise(5, 3 << 20));
}

#[test]
fn a_prune_removes_no_chunk_while_a_checkpoint_is_written_nor_a_crashed_writers_too_early() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&StoreUrl::parse(root.to_str().unwrap()).unwrap()).unwrap();
    let src = dir.path().join("a.img");
    std::fs::write(&src, noise(9, 2 << 20)).unwrap();
    let pieces = vec![Piece {
        name: "a.img".into(),
        path: src,
        cuts: vec![],
        first: None,
    }];
    rt.block_on(async {
        // A writer that sent its chunks but has not written its manifest yet.
        let mut w = Writing::begin(&store).await.unwrap();
        let up = upload(&w, &pieces, 1, None).await.unwrap();
        let p = prune(&store, &Keep::default()).await.unwrap();
        assert_eq!(p.chunks_removed, 0, "{p:?}");
        assert!(
            p.chunks_deferred
                .as_deref()
                .unwrap()
                .contains("being written"),
            "{p:?}"
        );
        assert_eq!(chunk_files(&root).len(), 2);
        w.commit("c", manifest(&up.entries)).await.unwrap();
        // A writer killed after sending: its marker is live, so nothing goes yet; once stale
        // (its time set back past the limit) its chunks and marker go.
        std::fs::write(dir.path().join("a.img"), noise(10, 1 << 20)).unwrap();
        let w = Writing::begin(&store).await.unwrap();
        upload(&w, &pieces, 1, None).await.unwrap();
        std::mem::forget(w);
        assert_eq!(chunk_files(&root).len(), 3);
        let p = prune(
            &store,
            &Keep {
                newest: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(p.chunks_removed, 0, "{p:?}");
        for m in std::fs::read_dir(root.join("uploads")).unwrap().flatten() {
            let old =
                std::time::SystemTime::now() - gc::MARKER_TTL - std::time::Duration::from_secs(5);
            std::fs::File::options()
                .write(true)
                .open(m.path())
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let p = prune(
            &store,
            &Keep {
                newest: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(p.chunks_removed, 1, "{p:?}");
        assert_eq!(chunk_files(&root).len(), 2);
        assert_eq!(std::fs::read_dir(root.join("uploads")).unwrap().count(), 0);
        // A killed prune's lock holds a writer back only until it goes stale.
        std::fs::create_dir_all(root.join("gc")).unwrap();
        std::fs::write(root.join("gc/lock"), b"{}").unwrap();
        let old = std::time::SystemTime::now() - gc::LOCK_TTL - std::time::Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(root.join("gc/lock"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let t = std::time::Instant::now();
        let w = Writing::begin(&store).await.unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        w.abandon().await;
        // The prune that finds it removes it and leaves the chunks to the next one.
        let keep1 = Keep {
            newest: 1,
            ..Default::default()
        };
        let p = prune(&store, &keep1).await.unwrap();
        assert!(
            p.chunks_deferred.as_deref().unwrap().contains("dead prune"),
            "{p:?}"
        );
        assert!(!root.join("gc/lock").exists());
        let p = prune(&store, &keep1).await.unwrap();
        assert!(p.chunks_deferred.is_none(), "{p:?}");
        assert!(!root.join("gc/lock").exists());
    });
}

/// A move's upload in two rounds (post-copy): the first stores only what a restore needs
/// before the task runs and lists the rest under stand-ins; the rest is named without being
/// sent, then stored under those names. The result is what a one-round upload makes, and a
/// chunk whose bytes changed after it was named is refused by its reader.
#[test]
fn a_two_round_upload_stores_what_is_needed_first_and_then_the_same_checkpoint() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let (root, store, src) = folder_store(dir.path());
    std::fs::write(src.join("small.img"), noise(1, 3000)).unwrap();
    std::fs::write(src.join("pages-1.img"), noise(2, 6 << 20)).unwrap();
    let pieces = vec![
        Piece {
            name: "images/small.img".into(),
            path: src.join("small.img"),
            ..Default::default()
        },
        Piece {
            name: "images/pages-1.img".into(),
            path: src.join("pages-1.img"),
            // Six 1 MiB chunks; bytes in the second and the fifth are needed first.
            cuts: vec![1 << 20; 6],
            first: Some(vec![((1 << 20) + 5, 10), ((4 << 20) + 4096, 4096)]),
        },
    ];
    let whole = cedana_store::plan(&pieces).unwrap();
    let mut w = rt.block_on(Writing::begin(&store)).unwrap();
    let first = rt
        .block_on(cedana_store::upload_first(&w, &pieces, 1))
        .unwrap();
    assert_eq!(first.chunks_sent, 3, "the small image and two page chunks");
    assert_eq!(chunk_files(&root).len(), 3);
    let stand_ins: Vec<(usize, usize)> = first
        .entries
        .iter()
        .enumerate()
        .flat_map(|(e, entry)| {
            entry
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.id.unnamed_at().is_some())
                .map(move |(i, _)| (e, i))
        })
        .collect();
    assert_eq!(stand_ins, vec![(1, 0), (1, 2), (1, 3), (1, 5)]);
    for (e, i) in &stand_ins {
        let c = first.entries[*e].chunks[*i];
        assert_eq!(c.id.unnamed_at(), Some((*e as u32, *i as u32)));
        assert_eq!(c.size, 1 << 20);
    }
    let named = cedana_store::name_rest(&pieces, &first.entries).unwrap();
    assert_eq!(named, whole, "named as a one-round upload names them");
    // The fourth chunk changes after it was named: it is stored under the old name, and its
    // reader refuses it.
    let mut bytes = std::fs::read(src.join("pages-1.img")).unwrap();
    bytes[(3 << 20) + 7] ^= 0xff;
    std::fs::write(src.join("pages-1.img"), &bytes).unwrap();
    let up = rt
        .block_on(cedana_store::upload_named(
            &w, &pieces, &named, &first, 1, None,
        ))
        .unwrap();
    assert_eq!(up.entries, whole);
    assert_eq!((up.chunks, up.chunks_sent), (7, 7));
    rt.block_on(w.commit("moved", manifest(&up.entries)))
        .unwrap();
    let changed = named[1].chunks[3];
    let good = named[1].chunks[2];
    assert!(rt.block_on(store.get_chunk("moved", &good)).is_ok());
    match rt.block_on(store.get_chunk("moved", &changed)) {
        Err(StoreError::BadChunk { .. }) => {}
        other => panic!("a chunk changed after naming was read back: {other:?}"),
    }
}
