//! Hugging Face safetensors checkpoints, memory-mapped: a single `model.safetensors` or a
//! sharded set listed by `model.safetensors.index.json`.
//!
//! Only headers are parsed up front; a tensor's bytes are read (and converted to f32) when it
//! is asked for, so a worker that holds a few experts touches only their pages.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::LoadError;
use crate::tensor::Tensor;
use crate::weight::Weight;

/// Where one tensor lives: file index, element type, shape and absolute byte range.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) file: usize,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    /// Absolute byte range inside the file.
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// The safetensors files of a checkpoint directory (one file, or the shards its index names,
/// sorted).
pub(crate) fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let shard_names: Vec<String> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Checkpoint {
            path: index.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Checkpoint {
                path: index.clone(),
                message: "missing object `weight_map`".into(),
            })?;
        let mut names: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| LoadError::Checkpoint {
                path: index.clone(),
                message: format!("weight_map entry for `{tensor}` is not a file name"),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(LoadError::Checkpoint {
                    path: index.clone(),
                    message: format!("weight_map entry `{file}` must be a file in the checkpoint directory"),
                });
            }
            if !names.iter().any(|n| n == file) {
                names.push(file.to_string());
            }
        }
        names.sort();
        names
    } else if single.exists() {
        vec!["model.safetensors".to_string()]
    } else {
        return Err(LoadError::Checkpoint {
            path: dir.to_path_buf(),
            message: "neither model.safetensors nor model.safetensors.index.json found".into(),
        });
    };
    Ok(shard_names.iter().map(|n| dir.join(n)).collect())
}

/// Parses the header of safetensors file number `file` (its whole contents, usually a
/// memory map: only the header pages are touched) into entries with absolute byte ranges.
pub(crate) fn header_entries(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<(String, Entry)>, LoadError> {
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| LoadError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("invalid safetensors header: {e}"),
    })?;
    let base = 8 + header_len;
    let mut out = Vec::new();
    for (tname, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let (start, end) = (base + s, base + e);
        if end > bytes.len() || start > end {
            return Err(LoadError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("tensor `{tname}` lies outside the file (truncated?)"),
            });
        }
        out.push((
            tname.clone(),
            Entry {
                file,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start,
                end,
            },
        ));
    }
    Ok(out)
}

/// Looks a tensor up by name and checks its shape.
pub(crate) fn find_entry<'a>(
    entries: &'a HashMap<String, Entry>,
    name: &str,
    expected: &[usize],
) -> Result<&'a Entry, LoadError> {
    let e = entries.get(name).ok_or_else(|| LoadError::MissingTensor {
        name: name.to_string(),
        expected: expected.to_vec(),
    })?;
    if e.shape != expected {
        return Err(LoadError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: e.shape.clone(),
        });
    }
    Ok(e)
}

/// The entry of slab `index` of a tensor stacked along its first dimension; `expected` is
/// the full shape.
pub(crate) fn slab_entry(
    entries: &HashMap<String, Entry>,
    name: &str,
    expected: &[usize],
    index: usize,
) -> Result<Entry, LoadError> {
    let e = entries.get(name).ok_or_else(|| LoadError::MissingTensor {
        name: name.to_string(),
        expected: expected.to_vec(),
    })?;
    if e.shape != expected || expected.is_empty() || index >= expected[0] {
        return Err(LoadError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: e.shape.clone(),
        });
    }
    let width = e.dtype.bitsize() / 8;
    let slab: usize = expected[1..].iter().product::<usize>() * width;
    Ok(Entry {
        start: e.start + index * slab,
        end: e.start + (index + 1) * slab,
        shape: expected[1..].to_vec(),
        ..e.clone()
    })
}

/// Anything model weights can be read from by name: a checkpoint on disk, or a generator of
/// random weights (for tests and benchmarks) that records what was asked for.
pub trait TensorSource {
    /// Reads a tensor as f32, checking its shape.
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError>;
    /// Reads slab `index` of a tensor stacked along its first dimension; `expected` is the
    /// full shape.
    fn tensor_slab(&self, name: &str, expected: &[usize], index: usize) -> Result<Tensor, LoadError>;
    fn contains(&self, name: &str) -> bool;
    /// Reads a `[out, in]` matrix weight, keeping bf16 storage where the source has it.
    fn weight(&self, name: &str, expected: &[usize]) -> Result<Weight, LoadError> {
        self.tensor(name, expected).map(Weight::F32)
    }
    /// `Ok(None)` when absent, an error when present but malformed.
    fn optional(&self, name: &str, expected: &[usize]) -> Result<Option<Tensor>, LoadError> {
        if self.contains(name) {
            self.tensor(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }
}

pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} tensors)", self.dir.display(), self.entries.len())
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Checkpoint {
    /// Opens the safetensors files of a checkpoint directory.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in shard_paths(dir)?.into_iter().enumerate() {
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the file is opened read-only; checkpoints are not modified while served.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            entries.extend(header_entries(&path, &mmap, fi)?);
            files.push((path, mmap));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    fn read(&self, name: &str, e: &Entry) -> Result<Tensor, LoadError> {
        let bytes = &self.files[e.file].1[e.start..e.end];
        let n: usize = e.shape.iter().product();
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(LoadError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        if bytes.len() != n * width {
            return Err(LoadError::Checkpoint {
                path: self.files[e.file].0.clone(),
                message: format!(
                    "tensor `{name}` has {} bytes for {n} {:?} elements",
                    bytes.len(),
                    e.dtype
                ),
            });
        }
        let data: Vec<f32> = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        };
        Tensor::new(e.shape.clone(), data).map_err(|err| LoadError::Checkpoint {
            path: self.files[e.file].0.clone(),
            message: format!("tensor `{name}`: {err}"),
        })
    }
}

impl TensorSource for Checkpoint {
    fn weight(&self, name: &str, expected: &[usize]) -> Result<Weight, LoadError> {
        match self.entries.get(name) {
            Some(e) if e.dtype == Dtype::BF16 && expected.len() == 2 && e.shape == expected => {
                let bytes = &self.files[e.file].1[e.start..e.end];
                if bytes.len() != expected[0] * expected[1] * 2 {
                    return Err(LoadError::Checkpoint {
                        path: self.files[e.file].0.clone(),
                        message: format!("tensor `{name}` has {} bytes for shape {expected:?}", bytes.len()),
                    });
                }
                Ok(Weight::Bf16 {
                    rows: expected[0],
                    cols: expected[1],
                    data: bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                })
            }
            _ => self.tensor(name, expected).map(Weight::F32),
        }
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        self.read(name, find_entry(&self.entries, name, expected)?)
    }

    /// Reads slab `index` of a tensor stacked along its first dimension (a fused expert
    /// tensor `[E, ...]`), touching only that slab's bytes. `expected` is the full shape.
    fn tensor_slab(&self, name: &str, expected: &[usize], index: usize) -> Result<Tensor, LoadError> {
        self.read(name, &slab_entry(&self.entries, name, expected, index)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// One tensor to write: name, element type, shape and little-endian bytes.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Self {
        RawTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i64(name: impl Into<String>, shape: Vec<usize>, data: &[i64]) -> Self {
        RawTensor {
            name: name.into(),
            dtype: Dtype::I64,
            shape,
            bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Writes tensors to a safetensors file.
pub fn save_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<(), LoadError> {
    let views = tensors
        .iter()
        .map(|t| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| LoadError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("tensor `{}`: {e}", t.name),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).map_err(|e| LoadError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
