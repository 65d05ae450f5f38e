//! The `cuda` backend: the [`nets`](crate::nets) networks on an NVIDIA GPU with cudarc.
//!
//! Every dense layer and convolution is one cuBLAS SGEMM (a convolution is an im2col kernel,
//! then one GEMM with the batch folded into the rows, NHWC activations); the element-wise
//! parts (bias, ReLU, residual add, layout change, pooling) are NVRTC kernels compiled at
//! start. One stream per GPU; inputs go up from a write-combined pinned buffer, logits come
//! down into a plain pinned buffer (write-combined memory is slow for the host to read); CUDA
//! events measure each batch's device time. The backend lives on its GPU's worker thread,
//! never on a reactor.
//!
//! The build needs no CUDA (cudarc's `dynamic-loading`). [`driver_check`] runs before any
//! driver call: without `libcuda`, `--backend cuda` fails with "no CUDA driver found", never a
//! panic.
//!
//! Not built yet: overlapping the next batch's upload with the current batch (each batch
//! uploads, computes and downloads in turn on its stream).

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg};

use crate::backend::{Backend, BatchOutput, ByModel, ModelSpec};
use crate::nets::{DecodedBatch, Network, Weights, OUTPUTS, RESNET_CHANNELS, RESNET_SIDE, RESNET_WIDTH};

/// Whether the CUDA driver, cuBLAS and NVRTC libraries can be loaded; the message says what
/// is missing. Makes no driver call.
pub fn driver_check() -> Result<(), String> {
    // SAFETY: these only try to dlopen the libraries; no CUDA function is called.
    let (driver, blas, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(
            "no CUDA driver found (libcuda.so could not be loaded): --backend cuda needs an \
                    NVIDIA GPU and its driver; use --backend cpu or sim here"
                .to_string(),
        );
    }
    if !blas || !nvrtc {
        return Err(format!(
            "the CUDA driver is present but {} could not be loaded: install the CUDA 12 runtime libraries",
            [(!blas).then_some("libcublas"), (!nvrtc).then_some("libnvrtc")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and ")
        ));
    }
    Ok(())
}

/// GPUs the driver sees (0 without a driver).
pub fn device_count() -> usize {
    if driver_check().is_err() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

const KERNELS: &str = r#"
extern "C" __global__ void bias_act(float* y, const float* b, int rows, int cols, int relu) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * cols) {
        float v = y[i] + b[i % cols];
        y[i] = (relu && v < 0.0f) ? 0.0f : v;
    }
}
extern "C" __global__ void add_relu(float* y, const float* skip, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = y[i] + skip[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}
// CHW images (batch of them) into NHWC rows.
extern "C" __global__ void chw_to_nhwc(const float* x, float* y, int batch, int channels, int pixels) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < batch * channels * pixels) {
        int n = i / (channels * pixels);
        int c = (i / pixels) % channels;
        int p = i % pixels;
        y[(n * pixels + p) * channels + c] = x[i];
    }
}
// im2col for a 3x3 convolution, stride 1, zero padding 1, NHWC rows: one thread per
// (row, ky, kx, c) element of cols [batch*side*side, 9*cin].
extern "C" __global__ void im2col3x3(const float* x, float* cols, int batch, int side, int cin) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int width = 9 * cin;
    if (i < batch * side * side * width) {
        int row = i / width;
        int k = i % width;
        int c = k % cin;
        int kx = (k / cin) % 3;
        int ky = k / (3 * cin);
        int n = row / (side * side);
        int y = (row / side) % side;
        int xx = row % side;
        int sy = y + ky - 1;
        int sx = xx + kx - 1;
        float v = 0.0f;
        if (sy >= 0 && sy < side && sx >= 0 && sx < side) {
            v = x[((n * side + sy) * side + sx) * cin + c];
        }
        cols[i] = v;
    }
}
// Mean over each image's pixels: [batch*pixels, ch] into [batch, ch].
extern "C" __global__ void avgpool(const float* x, float* y, int batch, int pixels, int ch) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < batch * ch) {
        int n = i / ch;
        int c = i % ch;
        float acc = 0.0f;
        for (int p = 0; p < pixels; ++p) {
            acc += x[(n * pixels + p) * ch + c];
        }
        y[i] = acc / pixels;
    }
}
"#;

#[derive(Debug)]
struct Kernels {
    bias_act: CudaFunction,
    add_relu: CudaFunction,
    chw_to_nhwc: CudaFunction,
    im2col: CudaFunction,
    avgpool: CudaFunction,
}

/// A layer's weights on the device: `w` row-major `[inputs, outputs]`.
#[derive(Debug)]
struct DeviceLayer {
    inputs: usize,
    outputs: usize,
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
}

#[derive(Debug)]
struct DeviceModel {
    network: Network,
    convs: Vec<DeviceLayer>,
    dense: Vec<DeviceLayer>,
}

fn cuda_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("CUDA {what}: {e}")
}

fn elems(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}

/// Runs models on one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    models: ByModel<DeviceModel>,
    batch: DecodedBatch,
    /// Kept from batch to batch and grown when a batch needs more: the upload source
    /// (write-combined pinned), its device copy, and the download target (plain pinned).
    pinned_in: Option<PinnedHostSlice<f32>>,
    device_in: Option<CudaSlice<f32>>,
    pinned_out: Option<PinnedHostSlice<f32>>,
    /// Device time of the last batch, milliseconds (CUDA events).
    last_device_ms: f32,
}

impl CudaBackend {
    /// A backend on GPU `ordinal` for every model a network runs.
    pub fn new(ordinal: usize, models: &[ModelSpec]) -> Result<CudaBackend, String> {
        let mut backend = CudaBackend::open(ordinal)?;
        backend.models = ByModel::build("cuda", models, |m| {
            Weights::for_model(&m.name)
                .map(|weights| upload(&backend.stream, &weights))
                .transpose()
        })?;
        Ok(backend)
    }

    /// A backend for one network (the profiler and tests), as model id 0.
    pub fn of_weights(ordinal: usize, weights: &Weights) -> Result<CudaBackend, String> {
        let mut backend = CudaBackend::open(ordinal)?;
        backend.models = ByModel::single(upload(&backend.stream, weights)?);
        Ok(backend)
    }

    /// The context, stream, cuBLAS handle and kernels of GPU `ordinal`; no model yet.
    fn open(ordinal: usize) -> Result<CudaBackend, String> {
        driver_check()?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_error("context"))?;
        let stream = ctx.new_stream().map_err(cuda_error("stream"))?;
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|e| format!("cuBLAS: {e}"))?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| format!("NVRTC: {e}"))?;
        let module = ctx.load_module(ptx).map_err(cuda_error("module"))?;
        let load = |name: &str| module.load_function(name).map_err(cuda_error("kernel"));
        let kernels = Kernels {
            bias_act: load("bias_act")?,
            add_relu: load("add_relu")?,
            chw_to_nhwc: load("chw_to_nhwc")?,
            im2col: load("im2col3x3")?,
            avgpool: load("avgpool")?,
        };
        Ok(CudaBackend {
            ordinal,
            stream,
            blas,
            kernels,
            models: ByModel::build("cuda", &[], |_| Ok(None))?,
            batch: DecodedBatch::default(),
            pinned_in: None,
            device_in: None,
            pinned_out: None,
            last_device_ms: 0.0,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The last batch's time on the device (CUDA events), milliseconds.
    pub fn last_device_ms(&self) -> f32 {
        self.last_device_ms
    }

    /// `y[rows, layer.outputs] = x[rows, layer.inputs] · w`, then bias (and ReLU).
    fn dense(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        layer: &DeviceLayer,
        relu: bool,
    ) -> Result<CudaSlice<f32>, String> {
        let mut y = self
            .stream
            .alloc_zeros::<f32>(rows * layer.outputs)
            .map_err(cuda_error("alloc"))?;
        // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: pass B first, swap m and n.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: layer.outputs as i32,
            n: rows as i32,
            k: layer.inputs as i32,
            alpha: 1.0f32,
            lda: layer.outputs as i32,
            ldb: layer.inputs as i32,
            beta: 0.0f32,
            ldc: layer.outputs as i32,
        };
        // SAFETY: the three buffers hold exactly the sizes the config describes.
        unsafe { self.blas.gemm(cfg, &layer.w, x, &mut y) }.map_err(|e| format!("cuBLAS gemm: {e}"))?;
        let (rows_i, cols_i, relu_i) = (rows as i32, layer.outputs as i32, i32::from(relu));
        let mut launch = self.stream.launch_builder(&self.kernels.bias_act);
        launch.arg(&mut y).arg(&layer.b).arg(&rows_i).arg(&cols_i).arg(&relu_i);
        // SAFETY: the kernel reads `rows * cols` elements of `y` and `cols` of `b`.
        unsafe { launch.launch(elems(rows * layer.outputs)) }.map_err(cuda_error("bias"))?;
        Ok(y)
    }

    fn conv(
        &self,
        x: &CudaSlice<f32>,
        batch: usize,
        layer: &DeviceLayer,
        relu: bool,
    ) -> Result<CudaSlice<f32>, String> {
        let rows = batch * RESNET_SIDE * RESNET_SIDE;
        let cin = layer.inputs / 9;
        let mut cols = self
            .stream
            .alloc_zeros::<f32>(rows * layer.inputs)
            .map_err(cuda_error("alloc"))?;
        let (batch_i, side_i, cin_i) = (batch as i32, RESNET_SIDE as i32, cin as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.im2col);
        launch.arg(x).arg(&mut cols).arg(&batch_i).arg(&side_i).arg(&cin_i);
        // SAFETY: `x` holds `rows * cin` elements, `cols` `rows * 9 * cin`.
        unsafe { launch.launch(elems(rows * layer.inputs)) }.map_err(cuda_error("im2col"))?;
        self.dense(&cols, rows, layer, relu)
    }

    fn forward(&self, model: &DeviceModel, input: &CudaSlice<f32>, batch: usize) -> Result<CudaSlice<f32>, String> {
        match model.network {
            Network::Mlp => {
                let mut x = self.dense(input, batch, &model.dense[0], true)?;
                for (index, layer) in model.dense[1..].iter().enumerate() {
                    x = self.dense(&x, batch, layer, index + 2 < model.dense.len())?;
                }
                Ok(x)
            }
            Network::ResNet => {
                let pixels = RESNET_SIDE * RESNET_SIDE;
                let mut nhwc = self
                    .stream
                    .alloc_zeros::<f32>(batch * pixels * RESNET_CHANNELS)
                    .map_err(cuda_error("alloc"))?;
                let (batch_i, channels_i, pixels_i) = (batch as i32, RESNET_CHANNELS as i32, pixels as i32);
                let mut launch = self.stream.launch_builder(&self.kernels.chw_to_nhwc);
                launch
                    .arg(input)
                    .arg(&mut nhwc)
                    .arg(&batch_i)
                    .arg(&channels_i)
                    .arg(&pixels_i);
                // SAFETY: both buffers hold `batch * channels * pixels` elements.
                unsafe { launch.launch(elems(batch * pixels * RESNET_CHANNELS)) }.map_err(cuda_error("layout"))?;
                let mut h = self.conv(&nhwc, batch, &model.convs[0], true)?;
                for block in model.convs[1..].chunks(2) {
                    let inner = self.conv(&h, batch, &block[0], true)?;
                    let mut out = self.conv(&inner, batch, &block[1], false)?;
                    let n_i = (batch * pixels * RESNET_WIDTH) as i32;
                    let mut launch = self.stream.launch_builder(&self.kernels.add_relu);
                    launch.arg(&mut out).arg(&h).arg(&n_i);
                    // SAFETY: `out` and `h` hold `n` elements each.
                    unsafe { launch.launch(elems(batch * pixels * RESNET_WIDTH)) }.map_err(cuda_error("add"))?;
                    h = out;
                }
                let mut pooled = self
                    .stream
                    .alloc_zeros::<f32>(batch * RESNET_WIDTH)
                    .map_err(cuda_error("alloc"))?;
                let width_i = RESNET_WIDTH as i32;
                let mut launch = self.stream.launch_builder(&self.kernels.avgpool);
                launch
                    .arg(&h)
                    .arg(&mut pooled)
                    .arg(&batch_i)
                    .arg(&pixels_i)
                    .arg(&width_i);
                // SAFETY: `h` holds `batch * pixels * width` elements, `pooled` `batch * width`.
                unsafe { launch.launch(elems(batch * RESNET_WIDTH)) }.map_err(cuda_error("pool"))?;
                self.dense(&pooled, batch, &model.dense[0], false)
            }
        }
    }
}

fn upload(stream: &Arc<CudaStream>, weights: &Weights) -> Result<DeviceModel, String> {
    let layer = |inputs: usize, outputs: usize, w: &[f32], b: &[f32]| -> Result<DeviceLayer, String> {
        Ok(DeviceLayer {
            inputs,
            outputs,
            w: stream.clone_htod(w).map_err(cuda_error("upload"))?,
            b: stream.clone_htod(b).map_err(cuda_error("upload"))?,
        })
    };
    Ok(DeviceModel {
        network: weights.network,
        convs: weights
            .convs
            .iter()
            .map(|c| layer(9 * c.cin, c.cout, &c.w, &c.b))
            .collect::<Result<_, _>>()?,
        dense: weights
            .dense
            .iter()
            .map(|d| layer(d.inputs, d.outputs, &d.w, &d.b))
            .collect::<Result<_, _>>()?,
    })
}

impl Backend for CudaBackend {
    fn run(&mut self, model: u32, inputs: &[&[u8]], out: &mut BatchOutput) -> Result<(), String> {
        let network = self.models.get(model)?.network;
        self.batch.decode(network, inputs);
        let batch = self.batch.len();
        if batch == 0 {
            self.batch.answer(network, inputs, &[], out);
            return Ok(());
        }
        let values = self.batch.values.len();
        let ctx = Arc::clone(self.stream.context());
        if self.pinned_in.as_ref().is_none_or(|p| p.len() < values) {
            let capacity = values.next_power_of_two();
            // SAFETY: plain f32s, written below before any read.
            self.pinned_in = Some(unsafe { ctx.alloc_pinned::<f32>(capacity) }.map_err(cuda_error("pinned"))?);
            self.device_in = Some(self.stream.alloc_zeros::<f32>(capacity).map_err(cuda_error("alloc"))?);
        }
        if self.pinned_out.as_ref().is_none_or(|p| p.len() < batch * OUTPUTS) {
            let capacity = (batch * OUTPUTS).next_power_of_two();
            // Not write-combined: the host reads it. SAFETY: plain f32s, written by the copy.
            self.pinned_out =
                Some(unsafe { ctx.alloc_pinned_with_flags::<f32>(capacity, 0) }.map_err(cuda_error("pinned"))?);
        }
        // Taken out while the batch runs (`forward` borrows `self`); put back at the end (a
        // batch that fails drops them: the next allocates again).
        let (Some(mut pinned_in), Some(mut device_in), Some(mut pinned_out)) =
            (self.pinned_in.take(), self.device_in.take(), self.pinned_out.take())
        else {
            unreachable!("allocated above");
        };
        pinned_in.as_mut_slice().map_err(cuda_error("pinned"))?[..values].copy_from_slice(&self.batch.values);
        let start = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_error("event"))?;
        self.stream
            .memcpy_htod(&pinned_in, &mut device_in)
            .map_err(cuda_error("upload"))?;
        let device_model = self.models.get(model)?;
        let y = self.forward(device_model, &device_in, batch)?;
        self.stream
            .memcpy_dtoh(&y, &mut pinned_out)
            .map_err(cuda_error("download"))?;
        let end = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_error("event"))?;
        self.last_device_ms = start.elapsed_ms(&end).map_err(cuda_error("timing"))?;
        let logits = &pinned_out.as_slice().map_err(cuda_error("download"))?[..batch * OUTPUTS];
        self.batch.answer(network, inputs, logits, out);
        self.pinned_in = Some(pinned_in);
        self.device_in = Some(device_in);
        self.pinned_out = Some(pinned_out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::nets;

    #[test]
    fn without_a_driver_cuda_says_so_and_does_not_panic() {
        match driver_check() {
            Err(message) => {
                println!("skipped: no CUDA driver ({message})");
                let error = CudaBackend::new(0, &[]).unwrap_err();
                assert!(
                    error.contains("no CUDA driver found") || error.contains("could not be loaded"),
                    "{error}"
                );
                assert_eq!(device_count(), 0);
            }
            Ok(()) => println!("a CUDA driver is present: see cuda_matches_cpu"),
        }
    }

    #[test]
    fn cuda_matches_cpu() {
        if let Err(message) = driver_check() {
            println!("skipped: no CUDA driver ({message})");
            return;
        }
        if device_count() == 0 {
            println!("skipped: a CUDA driver but no GPU");
            return;
        }
        for network in Network::ALL {
            let weights = Weights::from_seed(network, 7);
            let mut cuda = CudaBackend::of_weights(0, &weights).expect("the cuda backend starts");
            let mut cpu = CpuBackend::of_weights(&weights);
            for batch in [1usize, 3, 8] {
                let inputs: Vec<Vec<u8>> = (0..batch).map(|i| nets::sample_input(network, i as u64)).collect();
                let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                let (mut a, mut b) = (BatchOutput::default(), BatchOutput::default());
                cuda.run(0, &views, &mut a).unwrap();
                cpu.run(0, &views, &mut b).unwrap();
                assert_eq!(a.lens, b.lens);
                for (x, y) in a.outputs.chunks_exact(4).zip(b.outputs.chunks_exact(4)) {
                    let (x, y) = (
                        f32::from_le_bytes(x.try_into().unwrap()),
                        f32::from_le_bytes(y.try_into().unwrap()),
                    );
                    assert!(
                        (x - y).abs() <= 1e-3 * y.abs().max(1.0),
                        "{network:?} batch {batch}: {x} vs {y}"
                    );
                }
                assert!(cuda.last_device_ms() > 0.0);
            }
        }
    }
}
