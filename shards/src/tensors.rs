//! The tensors a model declares (name, datatype, per-item shape), as the KServe v2 front end
//! shows and checks them. The scheduler itself sees a request's input as opaque bytes: the
//! front end packs the declared inputs in their declared order.

use serde::Deserialize;

/// The KServe v2 datatypes.
pub const DATATYPES: [&str; 14] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16",
    "BYTES",
];
/// Dimensions a declared shape may have.
pub const DIMS_LIMIT: usize = 8;
/// Tensors a model may declare on each side.
pub const TENSORS_LIMIT: usize = 64;
/// Bytes of a tensor's name.
pub const TENSOR_NAME_LIMIT: usize = 256;

/// One declared tensor: its shape is per item (the batch dimension is not in it); `-1` is a
/// dimension of any size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn new(name: &str, datatype: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            datatype: datatype.to_string(),
            shape: shape.to_vec(),
        }
    }

    /// Bytes of one element; `None` for BYTES (each element its length and its bytes).
    pub fn element_size(&self) -> Option<usize> {
        element_size(&self.datatype)
    }

    /// Elements of one item when no dimension is `-1`.
    pub fn fixed_elements(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)))
    }

    /// Bytes of one item when every dimension is fixed and the type has a fixed size.
    pub fn fixed_bytes(&self) -> Option<usize> {
        self.fixed_elements()?.checked_mul(self.element_size()?)
    }

    /// Whether a request's per-item `shape` fits this declaration.
    pub fn accepts(&self, shape: &[u64]) -> bool {
        shape.len() == self.shape.len()
            && shape
                .iter()
                .zip(&self.shape)
                .all(|(&got, &want)| want < 0 || got == want as u64)
    }

    /// Triton's name of the datatype in a model config (`TYPE_FP32`, `TYPE_STRING`).
    pub fn config_type(&self) -> String {
        match self.datatype.as_str() {
            "BYTES" => "TYPE_STRING".to_string(),
            other => format!("TYPE_{other}"),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > TENSOR_NAME_LIMIT {
            return Err(format!("a tensor name of 1 to {TENSOR_NAME_LIMIT} bytes"));
        }
        if !DATATYPES.contains(&self.datatype.as_str()) {
            return Err(format!("`{}`: a datatype of {}", self.name, DATATYPES.join(", ")));
        }
        if self.shape.len() > DIMS_LIMIT || self.shape.iter().any(|&d| d < -1) {
            return Err(format!(
                "`{}`: a shape of at most {DIMS_LIMIT} dimensions, each -1 (any) or a size",
                self.name
            ));
        }
        Ok(())
    }
}

/// Bytes of one element of `datatype`; `None` for BYTES or an unknown type.
pub fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => return None,
    })
}

/// A model's declared inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTensors {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The config declared them (else they are defaults another part may refine: the serve
    /// command gives a model named for a cpu network that network's tensors).
    pub declared: bool,
}

/// The input a model has when it declares none.
pub const DEFAULT_INPUT: &str = "INPUT0";
/// The output a model has when it declares none.
pub const DEFAULT_OUTPUT: &str = "OUTPUT0";

impl ModelTensors {
    /// A model that declares nothing: one UINT8 input of its `input_bytes` (any length
    /// without), one UINT8 output of any length.
    pub fn default_for(input_bytes: Option<u32>) -> ModelTensors {
        let input_shape = input_bytes.map_or(-1, i64::from);
        ModelTensors {
            inputs: vec![TensorSpec::new(DEFAULT_INPUT, "UINT8", &[input_shape])],
            outputs: vec![TensorSpec::new(DEFAULT_OUTPUT, "UINT8", &[-1])],
            declared: false,
        }
    }

    /// The declarations as given, checked: at least one of each, unique names, known
    /// datatypes, and inputs that add up to `input_bytes` when both are fixed.
    pub fn declared(
        inputs: Option<Vec<TensorSpec>>,
        outputs: Option<Vec<TensorSpec>>,
        input_bytes: Option<u32>,
    ) -> Result<ModelTensors, (&'static str, String)> {
        let default = ModelTensors::default_for(input_bytes);
        let declared = inputs.is_some() || outputs.is_some();
        let tensors = ModelTensors {
            inputs: inputs.unwrap_or(default.inputs),
            outputs: outputs.unwrap_or(default.outputs),
            declared,
        };
        for (side, list) in [("inputs", &tensors.inputs), ("outputs", &tensors.outputs)] {
            if list.is_empty() || list.len() > TENSORS_LIMIT {
                return Err((side, format!("1 to {TENSORS_LIMIT} tensors")));
            }
            for (at, tensor) in list.iter().enumerate() {
                tensor.check().map_err(|e| (side, e))?;
                if list[..at].iter().any(|t| t.name == tensor.name) {
                    return Err((side, format!("unique names, `{}` is there twice", tensor.name)));
                }
            }
        }
        let fixed: Option<usize> = tensors.inputs.iter().map(TensorSpec::fixed_bytes).sum();
        if let (Some(fixed), Some(bytes)) = (fixed, input_bytes) {
            if fixed != bytes as usize {
                return Err((
                    "inputs",
                    format!("inputs of {bytes} bytes in all (input_bytes), not {fixed}"),
                ));
            }
        }
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_checked() {
        let fp32 = |name: &str, shape: &[i64]| TensorSpec::new(name, "FP32", shape);
        assert!(ModelTensors::declared(Some(vec![fp32("x", &[3, 2])]), None, Some(24)).is_ok());
        let wrong_size = ModelTensors::declared(Some(vec![fp32("x", &[3, 2])]), None, Some(20));
        assert!(wrong_size.unwrap_err().1.contains("not 24"));
        let twice = ModelTensors::declared(Some(vec![fp32("x", &[1]), fp32("x", &[1])]), None, None);
        assert!(twice.unwrap_err().1.contains("twice"));
        let unknown = ModelTensors::declared(None, Some(vec![TensorSpec::new("y", "FP8", &[1])]), None);
        assert!(unknown.unwrap_err().1.contains("datatype"));
        assert!(ModelTensors::declared(Some(vec![]), None, None).is_err());
        assert!(fp32("x", &[-1, 4]).accepts(&[7, 4]));
        assert!(!fp32("x", &[-1, 4]).accepts(&[7, 5]));
        assert!(!fp32("x", &[4]).accepts(&[1, 4]));
    }
}
