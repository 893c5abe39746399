//! `--device` / `model.device`: "cpu", "cuda" or "cuda:N".

use candle_core::Device;

use crate::error::{Error, Result};

pub fn parse(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => {
                return Err(Error::Usage(format!(
                    "unknown device `{spec}`; use cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Usage(format!(
            "device `{spec}` asked for, but this st-tune was built without CUDA; \
             rebuild with `--features cuda` (scripts/build-cuda.sh) or use --device cpu"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Usage(format!("cannot open {spec}: {e}")))
}

/// The name `parse` takes for `device`: "cpu" or "cuda:N".
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
