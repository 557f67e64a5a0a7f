//! The Zarr v3 store schema: the one contract between `poodle-prep` and `poodle-train`, and
//! the only code that knows array names.
//!
//! One store per job part (`part-00003-of-00016.zarr`), a Zarr v3 group:
//!
//! | array | dtype | shape | meaning |
//! | --- | --- | --- | --- |
//! | `frames` | uint8 | (N, 2, 3, H, W) | frames t and t+dt, RGB planar (NCHW reads without a transpose) |
//! | `pairs` | int64 | (N, 3) | (video index, t, dt); video paths are in the group attributes |
//! | `valid` | bool | (N,) | false where a pair could not be decoded (or was filtered); its data is zeros |
//! | `flow/<model>/forward` | int16 | (N, 2, H, W) | flow t -> t+dt, (u, v) in stored pixels times 32 |
//! | `flow/<model>/backward` | int16 | (N, 2, H, W) | flow t+dt -> t (optional) |
//! | `flow/<model>/occlusion` | bool | (N, H, W) | pixels of frame t occluded in t+dt (DDFlow forward-backward check) |
//! | `flow/<model>/occlusion_backward` | bool | (N, H, W) | pixels of frame t+dt occluded in t (with `backward`) |
//! | `flow/<model>/stats` | float32 | (N, 6) | per-pair flow statistics, names in the flow group's attributes |
//!
//! Flow is int16 at 1/32 px ([`FLOW_QUANT_SCALE`], also stored as the array attribute
//! `scale_factor`): +-1024 px with at most 1/64 px of rounding, half of float16's bytes and
//! far below any flow model's error. Each inner chunk holds one pair (random access for
//! training); the sharding codec packs `pairs_per_shard` pairs into one file per array.
//!
//! Completion: each shard is written by one writer, then marked done in
//! `.poodle/done/`; array and group metadata (`zarr.json`) are written last, atomically,
//! once every shard is done, so valid metadata means complete data.

use crate::atomic::{read_json, write_atomic};
use crate::config::DatasetConfig;
use crate::flowmath::{FLOW_QUANT_SCALE, FLOW_STAT_NAMES};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use zarrs::array::codec::ZstdCodec;
use zarrs::array::{data_type, Array, ArrayBuilder, ArrayMetadata, ArrayMetadataOptions};
use zarrs::array::{ArrayShardedReadableExt, ArrayShardedReadableExtCache, CodecOptions};
use zarrs::filesystem::FilesystemStore;

pub const SCHEMA_VERSION: u32 = 1;
pub const FRAMES: &str = "frames";
pub const PAIRS: &str = "pairs";
pub const VALID: &str = "valid";
pub const FLOW_ROOT: &str = "flow";
pub const FORWARD: &str = "forward";
pub const BACKWARD: &str = "backward";
pub const OCCLUSION: &str = "occlusion";
pub const OCCLUSION_BACKWARD: &str = "occlusion_backward";
pub const STATS: &str = "stats";
/// Attribute key of poodle's metadata in the root group and in flow groups.
pub const ATTR_KEY: &str = "poodle";

/// Size of a store: pairs, frame size and shard size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub num_pairs: usize,
    pub height: usize,
    pub width: usize,
    pub pairs_per_shard: usize,
}

impl Geometry {
    pub fn num_shards(&self) -> usize {
        self.num_pairs.div_ceil(self.pairs_per_shard)
    }
    /// Pair indices of shard `k`.
    pub fn shard_pairs(&self, k: usize) -> std::ops::Range<usize> {
        let lo = k * self.pairs_per_shard;
        lo..((k + 1) * self.pairs_per_shard).min(self.num_pairs)
    }
    pub fn frame_len(&self) -> usize {
        2 * 3 * self.height * self.width
    }
    pub fn flow_len(&self) -> usize {
        2 * self.height * self.width
    }
    pub fn mask_len(&self) -> usize {
        self.height * self.width
    }
}

/// Compression levels, chosen by measurement (`bench/store_codecs.py`, README).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Codecs {
    pub frames_zstd: i32,
    pub flow_zstd: i32,
}

impl Default for Codecs {
    fn default() -> Self {
        Codecs {
            frames_zstd: 3,
            flow_zstd: 3,
        }
    }
}

/// Root group attributes (under [`ATTR_KEY`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreAttrs {
    pub schema_version: u32,
    pub tool_version: String,
    pub dataset: DatasetConfig,
    /// SHA-256 of the whole pair manifest (all parts) this store is a part of.
    pub manifest_sha256: String,
    pub part_index: usize,
    pub num_parts: usize,
    /// First pair of this part in the whole manifest.
    pub first_pair: usize,
    pub geometry: Geometry,
    /// Video paths relative to the dataset root; `pairs[:, 0]` indexes this list.
    pub videos: Vec<String>,
    pub root: String,
    /// Frame rate of each video in `videos` (same order), from the probe. The loader needs it
    /// to find the clip a pair belongs to under `clips` sampling; empty in stores written
    /// before it was recorded.
    #[serde(default)]
    pub video_fps: Vec<f64>,
}

/// Flow group attributes (under [`ATTR_KEY`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowAttrs {
    pub model_name: String,
    pub model_sha256: String,
    /// The model card as given.
    pub card: serde_json::Value,
    pub flow_scale: f32,
    pub backward: bool,
    pub occlusion: String,
    pub stat_names: Vec<String>,
}

fn zarr_err(path: &str) -> impl Fn(zarrs::array::ArrayCreateError) -> Error + '_ {
    move |e| Error::zarr(path, e)
}

/// The arrays of one store, built in memory (metadata not yet written).
pub struct StoreArrays {
    pub path: PathBuf,
    pub geometry: Geometry,
    storage: Arc<FilesystemStore>,
    frames: Array<FilesystemStore>,
    pairs: Array<FilesystemStore>,
    valid: Array<FilesystemStore>,
}

/// The arrays of one flow group.
pub struct FlowArrays {
    pub name: String,
    forward: Array<FilesystemStore>,
    backward: Option<(Array<FilesystemStore>, Array<FilesystemStore>)>,
    occlusion: Array<FilesystemStore>,
    stats: Array<FilesystemStore>,
}

#[allow(clippy::too_many_arguments)]
fn build(
    storage: &Arc<FilesystemStore>,
    path: &str,
    shape: Vec<u64>,
    dt: zarrs::array::DataType,
    fill: impl Into<zarrs::array::builder::ArrayBuilderFillValue>,
    pairs_per_shard: usize,
    zstd: Option<i32>,
    names: &[&str],
    attrs: serde_json::Map<String, serde_json::Value>,
) -> Result<Array<FilesystemStore>> {
    let mut shard = shape.clone();
    shard[0] = pairs_per_shard as u64;
    let mut inner = shape.clone();
    inner[0] = 1;
    let mut b = ArrayBuilder::new(shape, shard, dt, fill);
    b.subchunk_shape(inner)
        .dimension_names(Some(names.to_vec()))
        .attributes(attrs);
    if let Some(level) = zstd {
        b.bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(level, false))]);
    }
    b.build(storage.clone(), path).map_err(zarr_err(path))
}

fn store_storage(path: &Path) -> Result<Arc<FilesystemStore>> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(
        FilesystemStore::new(path).map_err(|e| Error::store(path, e.to_string()))?,
    ))
}

impl StoreArrays {
    pub fn new(path: &Path, geometry: Geometry, codecs: Codecs) -> Result<Self> {
        let storage = store_storage(path)?;
        let g = geometry;
        let n = g.num_pairs as u64;
        let (h, w) = (g.height as u64, g.width as u64);
        let none = serde_json::Map::new;
        Ok(StoreArrays {
            path: path.to_path_buf(),
            geometry,
            frames: build(
                &storage,
                &format!("/{FRAMES}"),
                vec![n, 2, 3, h, w],
                data_type::uint8(),
                0u8,
                g.pairs_per_shard,
                Some(codecs.frames_zstd),
                &["pair", "frame", "channel", "y", "x"],
                none(),
            )?,
            pairs: build(
                &storage,
                &format!("/{PAIRS}"),
                vec![n, 3],
                data_type::int64(),
                0i64,
                g.pairs_per_shard,
                Some(3),
                &["pair", "video_t_dt"],
                none(),
            )?,
            valid: build(
                &storage,
                &format!("/{VALID}"),
                vec![n],
                data_type::bool(),
                zarrs::array::FillValue::from(false),
                g.pairs_per_shard,
                Some(3),
                &["pair"],
                none(),
            )?,
            storage,
        })
    }

    pub fn flow_arrays(&self, name: &str, backward: bool, codecs: Codecs) -> Result<FlowArrays> {
        validate_group_name(name).map_err(|m| Error::store(&self.path, m))?;
        let g = self.geometry;
        let n = g.num_pairs as u64;
        let (h, w) = (g.height as u64, g.width as u64);
        let base = format!("/{FLOW_ROOT}/{name}");
        let mut scale = serde_json::Map::new();
        scale.insert("scale_factor".into(), serde_json::json!(FLOW_QUANT_SCALE));
        scale.insert("units".into(), serde_json::json!("pixels"));
        let flow = |which: &str| {
            build(
                &self.storage,
                &format!("{base}/{which}"),
                vec![n, 2, h, w],
                data_type::int16(),
                0i16,
                g.pairs_per_shard,
                Some(codecs.flow_zstd),
                &["pair", "uv", "y", "x"],
                scale.clone(),
            )
        };
        let mask = |which: &str| {
            build(
                &self.storage,
                &format!("{base}/{which}"),
                vec![n, h, w],
                data_type::bool(),
                zarrs::array::FillValue::from(false),
                g.pairs_per_shard,
                Some(codecs.flow_zstd),
                &["pair", "y", "x"],
                serde_json::Map::new(),
            )
        };
        let mut stat_attrs = serde_json::Map::new();
        stat_attrs.insert("names".into(), serde_json::json!(FLOW_STAT_NAMES));
        Ok(FlowArrays {
            name: name.to_string(),
            forward: flow(FORWARD)?,
            backward: if backward {
                Some((flow(BACKWARD)?, mask(OCCLUSION_BACKWARD)?))
            } else {
                None
            },
            occlusion: mask(OCCLUSION)?,
            stats: build(
                &self.storage,
                &format!("{base}/{STATS}"),
                vec![n, FLOW_STAT_NAMES.len() as u64],
                data_type::float32(),
                0f32,
                g.pairs_per_shard,
                Some(3),
                &["pair", "stat"],
                stat_attrs,
            )?,
        })
    }

    /// Write shard `k` of the frame arrays. Slices hold the shard's pairs in order.
    pub fn write_shard(
        &self,
        k: usize,
        frames: &[u8],
        pairs: &[i64],
        valid: &[bool],
    ) -> Result<()> {
        let g = self.geometry;
        let s = g.pairs_per_shard;
        store_padded(&self.frames, k, frames, s * g.frame_len(), 0u8, 5)?;
        store_padded(&self.pairs, k, pairs, s * 3, 0i64, 2)?;
        store_padded(&self.valid, k, valid, s, false, 1)
    }

    pub fn write_flow_shard(
        &self,
        fa: &FlowArrays,
        k: usize,
        forward: &[i16],
        backward: Option<(&[i16], &[bool])>,
        occlusion: &[bool],
        stats: &[f32],
    ) -> Result<()> {
        let g = self.geometry;
        let s = g.pairs_per_shard;
        store_padded(&fa.forward, k, forward, s * g.flow_len(), 0i16, 4)?;
        match (&fa.backward, backward) {
            (Some((a, m)), Some((b, o))) => {
                store_padded(a, k, b, s * g.flow_len(), 0i16, 4)?;
                store_padded(m, k, o, s * g.mask_len(), false, 3)?;
            }
            (None, None) => {}
            _ => {
                return Err(Error::store(
                    &self.path,
                    format!(
                        "flow group {}: backward flow given for a group without it, or missing",
                        fa.name
                    ),
                ))
            }
        }
        store_padded(&fa.occlusion, k, occlusion, s * g.mask_len(), false, 3)?;
        store_padded(&fa.stats, k, stats, s * FLOW_STAT_NAMES.len(), 0f32, 2)
    }

    /// Write the metadata of the frame arrays and the root group, last and atomically.
    pub fn finalize(&self, attrs: &StoreAttrs) -> Result<()> {
        for a in [&self.frames, &self.pairs, &self.valid] {
            write_array_metadata(&self.path, a)?;
        }
        write_group_metadata(&self.path.join(FLOW_ROOT), None)?;
        write_group_metadata(
            &self.path,
            Some(serde_json::to_value(attrs).expect("attrs")),
        )
    }

    pub fn finalize_flow(&self, fa: &FlowArrays, attrs: &FlowAttrs) -> Result<()> {
        let mut arrays = vec![&fa.forward, &fa.occlusion, &fa.stats];
        if let Some((b, m)) = &fa.backward {
            arrays.extend([b, m]);
        }
        for a in arrays {
            write_array_metadata(&self.path, a)?;
        }
        write_group_metadata(&self.path.join(FLOW_ROOT), None)?;
        write_group_metadata(
            &self.path.join(FLOW_ROOT).join(&fa.name),
            Some(serde_json::to_value(attrs).expect("attrs")),
        )
    }
}

/// Flow group names become directory names: keep them simple.
pub fn validate_group_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "flow group name {name:?} must be 1-64 characters of letters, digits, '_', '-', '.'"
        ))
    }
}

fn store_padded<T: zarrs::array::Element + Copy>(
    array: &Array<FilesystemStore>,
    k: usize,
    data: &[T],
    full_len: usize,
    fill: T,
    ndim: usize,
) -> Result<()> {
    let mut idx = vec![0u64; ndim];
    idx[0] = k as u64;
    let path = array.path().to_string();
    let res = if data.len() == full_len {
        array.store_chunk(&idx, data)
    } else {
        // The last shard of an array is partly outside it; pad it to the shard shape.
        let mut padded = data.to_vec();
        padded.resize(full_len, fill);
        array.store_chunk(&idx, &padded)
    };
    res.map_err(|e| Error::zarr(path, e))
}

fn write_array_metadata(root: &Path, a: &Array<FilesystemStore>) -> Result<()> {
    let meta = match a.metadata_opt(&ArrayMetadataOptions::default()) {
        ArrayMetadata::V3(m) => serde_json::to_vec_pretty(&m).expect("metadata serialises"),
        ArrayMetadata::V2(_) => unreachable!("poodle writes Zarr v3 only"),
    };
    let rel = a.path().as_str().trim_start_matches('/');
    write_atomic(&root.join(rel).join("zarr.json"), &meta)
}

fn write_group_metadata(dir: &Path, poodle: Option<serde_json::Value>) -> Result<()> {
    let mut attributes = serde_json::Map::new();
    if let Some(p) = poodle {
        attributes.insert(ATTR_KEY.into(), p);
    }
    let meta = serde_json::json!({
        "zarr_format": 3,
        "node_type": "group",
        "attributes": attributes,
    });
    write_atomic(
        &dir.join("zarr.json"),
        &serde_json::to_vec_pretty(&meta).expect("json"),
    )
}

/// One pair as read back from a store.
#[derive(Clone, Debug)]
pub struct PairRecord {
    pub video: i64,
    pub t: i64,
    pub dt: i64,
    pub valid: bool,
    /// (2, 3, H, W) uint8
    pub frames: Vec<u8>,
}

/// One pair's flow as read back from a store (already scaled to pixels).
#[derive(Clone, Debug)]
pub struct FlowRecord {
    /// (2, H, W) pixels
    pub forward: Vec<f32>,
    pub backward: Option<Vec<f32>>,
    /// (H, W): pixels of frame t occluded in t+dt
    pub occlusion: Vec<bool>,
    /// (H, W): pixels of frame t+dt occluded in t (with backward flow)
    pub occlusion_backward: Option<Vec<bool>>,
    pub stats: Vec<f32>,
}

/// A finished store opened for reading; validates the schema on open.
pub struct PoodleStore {
    pub path: PathBuf,
    pub attrs: StoreAttrs,
    pub flow_groups: Vec<(String, FlowAttrs)>,
    storage: Arc<FilesystemStore>,
    /// Arrays opened once per process (their metadata parsed once), each with its shard-index
    /// cache, so that reading a pair costs one shard-index lookup and one chunk decode.
    open: Mutex<HashMap<String, Arc<OpenArray>>>,
}

struct OpenArray {
    array: Array<FilesystemStore>,
    shard_index: ArrayShardedReadableExtCache,
}

fn group_attrs<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let meta: serde_json::Value = read_json(&dir.join("zarr.json"))?;
    let p = meta
        .get("attributes")
        .and_then(|a| a.get(ATTR_KEY))
        .ok_or_else(|| {
            Error::store(
                dir,
                format!("no '{ATTR_KEY}' attributes: not a poodle store"),
            )
        })?;
    serde_json::from_value(p.clone()).map_err(|e| Error::Json {
        path: dir.join("zarr.json"),
        source: e,
    })
}

impl PoodleStore {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("zarr.json").exists() {
            return Err(Error::store(
                path,
                "no zarr.json: not a store, or its job has not finished (rerun it to resume)",
            ));
        }
        let version: serde_json::Value = read_json(&path.join("zarr.json"))?;
        let v = version["attributes"][ATTR_KEY]["schema_version"].as_u64();
        if v != Some(u64::from(SCHEMA_VERSION)) {
            return Err(Error::store(
                path,
                format!("unknown schema version {v:?}; this build reads version {SCHEMA_VERSION}"),
            ));
        }
        let attrs: StoreAttrs = group_attrs(path)?;
        let mut flow_groups = Vec::new();
        let flow_dir = path.join(FLOW_ROOT);
        if let Ok(rd) = std::fs::read_dir(&flow_dir) {
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("zarr.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                let fa: FlowAttrs = group_attrs(&flow_dir.join(&n))?;
                flow_groups.push((n, fa));
            }
        }
        let storage =
            Arc::new(FilesystemStore::new(path).map_err(|e| Error::store(path, e.to_string()))?);
        let s = PoodleStore {
            path: path.to_path_buf(),
            attrs,
            flow_groups,
            storage,
            open: Mutex::new(HashMap::new()),
        };
        for name in [FRAMES, PAIRS, VALID] {
            s.array(&format!("/{name}"))?;
        }
        Ok(s)
    }

    pub fn num_pairs(&self) -> usize {
        self.attrs.geometry.num_pairs
    }

    /// Opens `path` the first time it is asked for; later calls share it.
    fn array(&self, path: &str) -> Result<Arc<OpenArray>> {
        if let Some(a) = self.open.lock().expect("array map").get(path) {
            return Ok(a.clone());
        }
        let array = Array::open(self.storage.clone(), path).map_err(|e| {
            Error::store(
                &self.path,
                format!("array {path} missing or unreadable: {e}"),
            )
        })?;
        let shard_index = ArrayShardedReadableExtCache::new(&array);
        let a = Arc::new(OpenArray { array, shard_index });
        self.open
            .lock()
            .expect("array map")
            .insert(path.to_string(), a.clone());
        Ok(a)
    }

    /// Pair `i` of `path`: its inner chunk (one pair each), through the shard-index cache.
    fn read<T: zarrs::array::ElementOwned>(&self, path: &str, i: usize) -> Result<Vec<T>> {
        let a = self.array(path)?;
        let mut chunk = vec![0u64; a.array.dimensionality()];
        chunk[0] = i as u64;
        a.array
            .retrieve_subchunk_opt::<Vec<T>>(&a.shard_index, &chunk, &CodecOptions::default())
            .map_err(|e| Error::store(&self.path, format!("{path}, pair {i}: {e}")))
    }

    pub fn read_pair(&self, i: usize) -> Result<PairRecord> {
        if i >= self.num_pairs() {
            return Err(Error::store(
                &self.path,
                format!("pair {i} out of range (store has {})", self.num_pairs()),
            ));
        }
        let meta: Vec<i64> = self.read(&format!("/{PAIRS}"), i)?;
        let valid: Vec<bool> = self.read(&format!("/{VALID}"), i)?;
        Ok(PairRecord {
            video: meta[0],
            t: meta[1],
            dt: meta[2],
            valid: valid[0],
            frames: self.read(&format!("/{FRAMES}"), i)?,
        })
    }

    pub fn flow_group(&self, name: Option<&str>) -> Result<&(String, FlowAttrs)> {
        match name {
            Some(n) => self
                .flow_groups
                .iter()
                .find(|(g, _)| g == n)
                .ok_or_else(|| {
                    let have: Vec<&str> =
                        self.flow_groups.iter().map(|(g, _)| g.as_str()).collect();
                    Error::store(&self.path, format!("no flow group {n:?}; it has {have:?}"))
                }),
            None => self
                .flow_groups
                .first()
                .ok_or_else(|| Error::store(&self.path, "store has no flow group")),
        }
    }

    pub fn read_flow(&self, group: &str, i: usize) -> Result<FlowRecord> {
        let (_, fa) = self.flow_group(Some(group))?;
        let base = format!("/{FLOW_ROOT}/{group}");
        let deq = |q: Vec<i16>| {
            q.into_iter()
                .map(|v| f32::from(v) * fa.flow_scale)
                .collect()
        };
        Ok(FlowRecord {
            forward: deq(self.read(&format!("{base}/{FORWARD}"), i)?),
            backward: if fa.backward {
                Some(deq(self.read(&format!("{base}/{BACKWARD}"), i)?))
            } else {
                None
            },
            occlusion: self.read(&format!("{base}/{OCCLUSION}"), i)?,
            occlusion_backward: if fa.backward {
                Some(self.read(&format!("{base}/{OCCLUSION_BACKWARD}"), i)?)
            } else {
                None
            },
            stats: self.read(&format!("{base}/{STATS}"), i)?,
        })
    }

    /// All per-pair rows of a small 2-D array (pairs or stats), for summaries.
    pub fn read_all_stats(&self, group: &str) -> Result<Vec<f32>> {
        let a = &self.array(&format!("/{FLOW_ROOT}/{group}/{STATS}"))?.array;
        a.retrieve_array_subset::<Vec<f32>>(&a.subset_all())
            .map_err(|e| Error::store(&self.path, format!("{group}/stats: {e}")))
    }

    /// `(video, t, dt)` of every pair, in pair order.
    pub fn read_all_pairs(&self) -> Result<Vec<[i64; 3]>> {
        let a = &self.array(&format!("/{PAIRS}"))?.array;
        let flat = a
            .retrieve_array_subset::<Vec<i64>>(&a.subset_all())
            .map_err(|e| Error::store(&self.path, format!("pairs: {e}")))?;
        if flat.len() != 3 * self.num_pairs() {
            return Err(Error::store(
                &self.path,
                format!(
                    "pairs: {} values for {} pairs",
                    flat.len(),
                    self.num_pairs()
                ),
            ));
        }
        Ok(flat.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())
    }

    pub fn read_all_valid(&self) -> Result<Vec<bool>> {
        let a = &self.array(&format!("/{VALID}"))?.array;
        a.retrieve_array_subset::<Vec<bool>>(&a.subset_all())
            .map_err(|e| Error::store(&self.path, format!("valid: {e}")))
    }

    /// Bytes on disk under the store, per top-level entry (array or group).
    pub fn disk_usage(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for name in [FRAMES, PAIRS, VALID] {
            out.push((name.to_string(), dir_size(&self.path.join(name))));
        }
        for (g, _) in &self.flow_groups {
            out.push((
                format!("{FLOW_ROOT}/{g}"),
                dir_size(&self.path.join(FLOW_ROOT).join(g)),
            ));
        }
        out
    }
}

pub fn dir_size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if md.is_file() {
        return md.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}
