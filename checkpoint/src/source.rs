//! Opening a model directory in either checkpoint layout as a [`WeightSource`] for the model.
//!
//! One reader serves both layouts: the converter's memory-mapped, validating [`Checkpoint`], which presents
//! HF names over DeepSeek's release layout (FP8 + E8M0, FP4 experts, BF16, F32, I64) as over HF's own, and
//! offers each weight in its stored form (BF16 and the quantised formats, no copy) or dequantised: a user
//! can run a real checkpoint without converting it first.

use std::ops::Range;
use std::path::Path;
use v4_convert::Checkpoint;
use v4_formats::PackedMatrix;
use v4_model::weights::{check_rows, rows_of_whole};
use v4_model::{HostData, HostTensor, LoadError, TensorSpec, WeightSource};

/// A checkpoint directory: weights in their stored form, or dequantised on read.
struct CheckpointSource(Checkpoint);

impl CheckpointSource {
    fn failed(&self, e: v4_convert::ConvertError) -> LoadError {
        LoadError::File {
            path: self.describe(),
            message: e.to_string(),
        }
    }
}

impl WeightSource for CheckpointSource {
    fn describe(&self) -> String {
        self.0.dir().display().to_string()
    }

    fn read(&self, name: &str, _spec: &TensorSpec<'_>) -> Result<HostTensor, LoadError> {
        let shape = self.0.hf_shape(name).ok_or_else(|| LoadError::Missing {
            source: self.describe(),
            name: name.to_string(),
        })?;
        let failed = |e| self.failed(e);
        let data = if self.0.hf_is_int(name) {
            HostData::I64(self.0.read_hf_i64(name).map_err(failed)?)
        } else {
            HostData::F32(self.0.read_hf_f32(name).map_err(failed)?)
        };
        Ok(HostTensor { shape, data })
    }

    fn read_packed(&self, name: &str, _shape: &[usize]) -> Result<Option<Vec<PackedMatrix>>, LoadError> {
        self.0.read_hf_packed(name).map_err(|e| self.failed(e))
    }

    fn read_rows(
        &self,
        name: &str,
        spec: &TensorSpec<'_>,
        rows: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        if self.0.hf_members(name).is_none_or(|m| m.len() == 1) {
            return rows_of_whole(self, name, spec, rows);
        }
        let mut shape = self.0.hf_shape(name).unwrap_or_default();
        check_rows(self, name, &shape, &rows)?;
        shape[0] = rows.len();
        let data = self
            .0
            .read_hf_experts_f32(name, rows)
            .map_err(|e| self.failed(e))?;
        Ok(HostTensor {
            shape,
            data: HostData::F32(data),
        })
    }

    fn read_packed_rows(
        &self,
        name: &str,
        _shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Option<Vec<PackedMatrix>>, LoadError> {
        let shape = self.0.hf_shape(name).unwrap_or_default();
        check_rows(self, name, &shape, &rows)?;
        self.0
            .read_hf_experts_packed(name, rows)
            .map_err(|e| self.failed(e))
    }

    fn names(&self) -> Vec<String> {
        self.0.hf_tensor_names()
    }
}

/// Opens the weights of `dir`, whichever layout it uses: every shard mapped and its header validated (a
/// truncated or corrupt file is an error here, naming the file and the tensor).
pub fn open(dir: &Path) -> Result<Box<dyn WeightSource>, LoadError> {
    let checkpoint = Checkpoint::open(dir).map_err(|e| LoadError::File {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(Box::new(CheckpointSource(checkpoint)))
}
