//! The MoEless data plane: checkpoint loading, tensor backends, the MoE engine and the
//! expert-function seam through which every routed expert runs.

pub mod backend;
pub mod tensor;
