//! Where expert weights come from: a [`WeightStore`] turns an [`ExpertKey`] into that
//! expert's [`ExpertWeights`].
//!
//! [`LocalStore`] reads a Hugging Face safetensors checkpoint by byte range: a worker that
//! holds a handful of experts reads only their bytes, straight into the buffers the instance
//! keeps (no memory map, no intermediate copy for f32 and bf16 weights). [`FallbackStore`]
//! chains stores, e.g. a warm peer first and the local disk second.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use safetensors::Dtype;
use shared::ExpertKey;

use crate::checkpoint::{find_entry, header_entries, io_err, shard_paths, slab_entry, Entry, TensorSource};
use crate::config::{ExpertLayout, FfnKind, ModelConfig};
use crate::error::LoadError;
use crate::expert::ExpertWeights;
use crate::tensor::Tensor;
use crate::weight::Weight;

/// One expert's weights as a store produced them.
#[derive(Debug)]
pub struct LoadedExpert {
    pub weights: ExpertWeights,
    /// Bytes read from the source (file ranges, or bytes received from a peer).
    pub bytes_read: u64,
    /// Where they came from, e.g. `local:/models/mixtral`.
    pub source: String,
}

/// A source of expert weights.
pub trait WeightStore: Send + Sync {
    /// Loads one routed expert's weights.
    fn load(&self, key: ExpertKey) -> Result<LoadedExpert, LoadError>;
    /// A one-line description for logs and status pages.
    fn describe(&self) -> String;
    /// Bytes `key`'s weights will occupy once loaded ([`ExpertWeights::bytes`]), when the
    /// store knows it without loading; lets the instance manager reserve memory up front.
    /// Called with the manager's lock held: it must be cheap and never block (no I/O).
    fn expected_bytes(&self, _key: ExpertKey) -> Option<u64> {
        None
    }
}

/// A safetensors checkpoint (single file or sharded index) read by byte range with positioned
/// reads. `config.json` and the safetensors headers are parsed once, at open.
pub struct LocalStore {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalStore({})", self.dir.display())
    }
}

impl LocalStore {
    /// Opens a checkpoint directory: `config.json` plus its safetensors file(s).
    pub fn open(dir: &Path) -> Result<LocalStore, LoadError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let config = ModelConfig::from_json_str(&text)?;
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in shard_paths(dir)?.into_iter().enumerate() {
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: read-only map, used only to parse the header (which also checks that every
            // tensor lies inside the file) and dropped before this function returns.
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            entries.extend(header_entries(&path, &map, fi)?);
            drop(map);
            files.push((path, file));
        }
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            config,
            files,
            entries,
        })
    }

    /// The model's configuration, from `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The byte ranges `(file index, start, end)` holding `key`'s weights: whole tensors for
    /// per-expert layouts, the expert's slab of each fused tensor for GPT-OSS.
    pub fn expert_ranges(&self, key: ExpertKey) -> Result<Vec<(usize, u64, u64)>, LoadError> {
        let src = RangeReader::new(self, false);
        ExpertWeights::load(&src, &self.config, key)?;
        Ok(src.ranges.take())
    }

    /// Total bytes of the checkpoint's safetensors files.
    pub fn file_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|(_, f)| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    fn path(&self, file: usize) -> &Path {
        &self.files[file].0
    }

    /// Reads `buf.len()` bytes at `offset` of file `file`.
    fn read_at(&self, file: usize, offset: u64, buf: &mut [u8]) -> Result<(), LoadError> {
        let (path, f) = &self.files[file];
        read_exact_at(f, buf, offset).map_err(io_err(path))
    }
}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset)
}

#[cfg(windows)]
fn read_exact_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match f.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Element types whose every bit pattern is a valid value, so a byte view of them may be
/// written by a read.
trait Plain: Copy + Default {}
impl Plain for f32 {}
impl Plain for u16 {}

fn as_bytes_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(v);
    // SAFETY: `T` is f32 or u16 (sealed by `Plain`): no padding, every bit pattern valid, and
    // u8 has alignment 1; the slice covers exactly the same memory and borrows `v` mutably.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) }
}

/// A [`TensorSource`] over a [`LocalStore`] that reads each asked-for range into a fresh
/// buffer of its final element type and counts the bytes; with `read == false` it only
/// records the ranges (and hands out zeros).
struct RangeReader<'a> {
    store: &'a LocalStore,
    read: bool,
    bytes_read: Cell<u64>,
    ranges: Cell<Vec<(usize, u64, u64)>>,
}

impl<'a> RangeReader<'a> {
    fn new(store: &'a LocalStore, read: bool) -> Self {
        Self {
            store,
            read,
            bytes_read: Cell::new(0),
            ranges: Cell::new(Vec::new()),
        }
    }

    /// Reads an entry's elements (as stored, little-endian) into a `Vec<T>`.
    fn elements<T: Plain>(&self, name: &str, e: &Entry) -> Result<Vec<T>, LoadError> {
        let n: usize = e.shape.iter().product();
        let width = std::mem::size_of::<T>();
        if e.end - e.start != n * width || e.dtype.bitsize() / 8 != width {
            return Err(LoadError::Checkpoint {
                path: self.store.path(e.file).to_path_buf(),
                message: format!(
                    "tensor `{name}` has {} bytes for {n} {:?} elements",
                    e.end - e.start,
                    e.dtype
                ),
            });
        }
        let mut ranges = self.ranges.take();
        ranges.push((e.file, e.start as u64, e.end as u64));
        self.ranges.set(ranges);
        // Zeroed allocation: for large buffers these are fresh zero pages, no memset pass.
        let mut v = vec![T::default(); n];
        if self.read {
            self.store.read_at(e.file, e.start as u64, as_bytes_mut(&mut v))?;
            self.bytes_read.set(self.bytes_read.get() + (n * width) as u64);
        }
        Ok(v)
    }

    fn read_tensor(&self, name: &str, e: &Entry) -> Result<Tensor, LoadError> {
        let data: Vec<f32> = match e.dtype {
            Dtype::F32 => {
                let mut v: Vec<f32> = self.elements(name, e)?;
                if cfg!(target_endian = "big") {
                    v.iter_mut()
                        .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                }
                v
            }
            Dtype::BF16 => self
                .elements::<u16>(name, e)?
                .into_iter()
                .map(|b| half::bf16::from_bits(u16::from_le(b)).to_f32())
                .collect(),
            Dtype::F16 => self
                .elements::<u16>(name, e)?
                .into_iter()
                .map(|b| half::f16::from_bits(u16::from_le(b)).to_f32())
                .collect(),
            other => {
                return Err(LoadError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Tensor::new(e.shape.clone(), data).map_err(|err| LoadError::Checkpoint {
            path: self.store.path(e.file).to_path_buf(),
            message: format!("tensor `{name}`: {err}"),
        })
    }
}

impl TensorSource for RangeReader<'_> {
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        self.read_tensor(name, find_entry(&self.store.entries, name, expected)?)
    }

    fn tensor_slab(&self, name: &str, expected: &[usize], index: usize) -> Result<Tensor, LoadError> {
        self.read_tensor(name, &slab_entry(&self.store.entries, name, expected, index)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.store.entries.contains_key(name)
    }

    /// bf16 matrices stay bf16, as [`crate::checkpoint::Checkpoint`] keeps them.
    fn weight(&self, name: &str, expected: &[usize]) -> Result<Weight, LoadError> {
        let e = find_entry(&self.store.entries, name, expected)?;
        if e.dtype == Dtype::BF16 && expected.len() == 2 {
            let mut data: Vec<u16> = self.elements(name, e)?;
            if cfg!(target_endian = "big") {
                data.iter_mut().for_each(|x| *x = u16::from_le(*x));
            }
            return Ok(Weight::Bf16 {
                rows: expected[0],
                cols: expected[1],
                data,
            });
        }
        self.read_tensor(name, e).map(Weight::F32)
    }
}

impl WeightStore for LocalStore {
    fn load(&self, key: ExpertKey) -> Result<LoadedExpert, LoadError> {
        let src = RangeReader::new(self, true);
        let weights = ExpertWeights::load(&src, &self.config, key)?;
        Ok(LoadedExpert {
            weights,
            bytes_read: src.bytes_read.get(),
            source: format!("local:{}", self.dir.display()),
        })
    }

    fn describe(&self) -> String {
        format!(
            "local:{} ({:?}, {} file(s))",
            self.dir.display(),
            self.config.arch,
            self.files.len()
        )
    }

    fn expected_bytes(&self, key: ExpertKey) -> Option<u64> {
        let cfg = &self.config;
        let (layer, e) = (key.layer as usize, key.expert as usize);
        if layer >= cfg.num_layers || cfg.layer_ffn[layer] != FfnKind::Moe || e >= cfg.moe.num_experts {
            return None;
        }
        let (h, i) = (cfg.hidden_size as u64, cfg.moe.expert_intermediate as u64);
        match cfg.moe.layout {
            // bf16 matrices stay bf16; everything else becomes f32.
            ExpertLayout::SwiGlu => cfg
                .expert_tensor_names(layer, e)
                .iter()
                .map(|n| {
                    self.entries
                        .get(n)
                        .map(|x| if x.dtype == Dtype::BF16 { 2 } else { 4 } * h * i)
                })
                .sum(),
            // Fused tensors are de-interleaved into f32 matrices plus f32 biases.
            ExpertLayout::GptOssFused => Some(4 * (3 * h * i + 2 * i + h)),
        }
    }
}

/// Tries stores in order and returns the first success (e.g. a warm peer, then local disk).
pub struct FallbackStore(pub Vec<Arc<dyn WeightStore>>);

impl WeightStore for FallbackStore {
    fn load(&self, key: ExpertKey) -> Result<LoadedExpert, LoadError> {
        let mut attempts = Vec::new();
        for store in &self.0 {
            match store.load(key) {
                Ok(loaded) => return Ok(loaded),
                Err(e) => attempts.push(format!("{}: {e}", store.describe())),
            }
        }
        Err(LoadError::NoStore { key, attempts })
    }

    fn describe(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|s| s.describe()).collect();
        format!("fallback[{}]", parts.join(", "))
    }

    fn expected_bytes(&self, key: ExpertKey) -> Option<u64> {
        self.0.iter().find_map(|s| s.expected_bytes(key))
    }
}

/// Raw read bandwidth beside instance cold-start bandwidth, measured in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ColdStartReport {
    /// Experts measured per pass.
    pub experts: usize,
    /// Timed passes of each kind.
    pub repeats: usize,
    /// Bytes of the experts' ranges in the checkpoint, per pass.
    pub bytes_per_pass: u64,
    /// Bytes the instances hold, per pass ([`ExpertWeights::bytes`]).
    pub instance_bytes_per_pass: u64,
    /// Total size of the checkpoint's safetensors files.
    pub file_bytes: u64,
    /// Plain positioned reads of the same ranges, no decode, each into a fresh buffer kept for
    /// the pass (the memory an instance needs: new pages, faulted in), median pass.
    pub raw_read_gbps: f64,
    /// Plain positioned reads into one reused buffer: the page-fault-free ceiling (page cache
    /// to a hot buffer), median pass.
    pub raw_read_reused_gbps: f64,
    /// Cold starts through an [`crate::instances::InstanceManager`] (load from the
    /// [`LocalStore`], build the instance, make it warm), checkpoint bytes per second (median).
    pub instance_gbps: f64,
    /// `instance_gbps / raw_read_gbps`.
    pub ratio: f64,
    /// `instance_gbps / raw_read_reused_gbps`.
    pub ratio_to_reused: f64,
    /// Median cold start of one expert, milliseconds.
    pub cold_start_ms_median: f64,
    /// Whether the file could be (and was, by an untimed pass) brought into the page cache:
    /// both paths are then measured equally warm. Dropping the cache needs root.
    pub cache_warm: bool,
    pub note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// `MemAvailable` from `/proc/meminfo`, when readable.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Measures, in one run and equally cache-warm, (a) the raw read bandwidth of `keys`' byte
/// ranges (positioned reads, no decode) and (b) instance cold starts of the same experts
/// (`LocalStore::load` plus making the instance warm in an `InstanceManager`), `repeats` timed
/// passes each, interleaved so drift hits both alike.
pub fn cold_start_bench(dir: &Path, keys: &[ExpertKey], repeats: usize) -> Result<ColdStartReport, LoadError> {
    use crate::instances::InstanceManager;
    use std::collections::BTreeSet;

    let store = Arc::new(LocalStore::open(dir)?);
    let config = Arc::new(store.config().clone());
    let mut ranges = Vec::new();
    for &key in keys {
        ranges.extend(store.expert_ranges(key)?);
    }
    let bytes_per_pass: u64 = ranges.iter().map(|&(_, s, e)| e - s).sum();
    let largest = ranges.iter().map(|&(_, s, e)| (e - s) as usize).max().unwrap_or(0);
    let raw_pass = |fresh: bool, reused: &mut Vec<u8>| -> Result<Duration, LoadError> {
        // Fresh buffers stay alive for the whole pass, as instances do: freed ones would be
        // recycled by the allocator and skip the page faults every real load pays.
        let mut kept = Vec::with_capacity(ranges.len());
        let t = Instant::now();
        for &(file, start, end) in &ranges {
            let len = (end - start) as usize;
            if fresh {
                let mut buf = vec![0u8; len];
                store.read_at(file, start, &mut buf)?;
                kept.push(buf);
            } else {
                store.read_at(file, start, &mut reused[..len])?;
                std::hint::black_box(&reused);
            }
        }
        let elapsed = t.elapsed();
        std::hint::black_box(&kept);
        Ok(elapsed)
    };
    let mut reused = vec![0u8; largest];
    // Untimed pass: brings the ranges into the page cache (if they fit) for both paths.
    raw_pass(false, &mut reused)?;

    let mut instance_bytes = 0u64;
    let (mut raw, mut raw_reused, mut inst, mut per_expert) = (vec![], vec![], vec![], vec![]);
    let none = BTreeSet::new();
    for _ in 0..repeats.max(1) {
        raw.push(gbps(bytes_per_pass, raw_pass(true, &mut reused)?));
        raw_reused.push(gbps(bytes_per_pass, raw_pass(false, &mut reused)?));
        let manager = InstanceManager::new(config.clone(), store.clone(), u64::MAX, Duration::ZERO, 1);
        let t = Instant::now();
        instance_bytes = 0;
        for &key in keys {
            let t1 = Instant::now();
            let w = manager.acquire(key).map_err(|e| match e {
                crate::instances::InstanceError::Load { source, .. } => source,
                other => LoadError::config("instance", other.to_string()),
            })?;
            per_expert.push(t1.elapsed().as_secs_f64() * 1e3);
            instance_bytes += w.bytes() as u64;
        }
        inst.push(gbps(bytes_per_pass, t.elapsed()));
        manager.set_wanted(&none);
        manager.tick();
    }
    let file_bytes = store.file_bytes();
    let cache_warm = mem_available().is_some_and(|m| bytes_per_pass < m / 2);
    let (raw_read_gbps, raw_reused_gbps, instance_gbps) = (median(raw), median(raw_reused), median(inst));
    Ok(ColdStartReport {
        experts: keys.len(),
        repeats: repeats.max(1),
        bytes_per_pass,
        instance_bytes_per_pass: instance_bytes,
        file_bytes,
        raw_read_gbps,
        raw_read_reused_gbps: raw_reused_gbps,
        instance_gbps,
        ratio: instance_gbps / raw_read_gbps.max(1e-12),
        ratio_to_reused: instance_gbps / raw_reused_gbps.max(1e-12),
        cold_start_ms_median: median(per_expert),
        cache_warm,
        note: if cache_warm {
            "ranges read once untimed first and fit in free memory: both paths measured page-cache warm".into()
        } else {
            "ranges exceed half of available memory: reads may reach the disk".into()
        },
    })
}
