//! The `cuda` backend: the [`nets`](crate::nets) networks on an NVIDIA GPU with cudarc.
//!
//! Every dense layer and convolution is one cuBLAS SGEMM (a convolution is an im2col kernel,
//! then one GEMM with the batch folded into the rows, NHWC activations); the element-wise
//! parts (bias, ReLU, residual add, layout change, pooling) are NVRTC kernels compiled at
//! start. One compute stream per GPU, and a copy stream beside it: while a batch computes,
//! the next plan's inputs (the worker names it) are decoded into the second of two input
//! slots and uploaded on the copy stream, so its upload overlaps the current batch
//! (cudarc's event tracking makes the compute stream wait for that upload, and the upload
//! wait for the last batch that read the slot). Inputs go up from write-combined pinned
//! buffers, logits come down into a plain pinned buffer (write-combined memory is slow for
//! the host to read); CUDA events measure each batch's device time (upload excluded when it
//! was staged). The backend lives on its GPU's worker thread, never on a reactor.
//!
//! The build needs no CUDA (cudarc's `dynamic-loading`). [`driver_check`] runs before any
//! driver call: without `libcuda`, `--backend cuda` fails with "no CUDA driver found", never a
//! panic.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use crate::backend::{Backend, Batch, BatchOutput, ByModel, ModelSpec};
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

/// One batch's inputs: decoded, in a write-combined pinned buffer (the upload source, kept
/// and grown as needed) and on the device.
#[derive(Debug, Default)]
struct InputSlot {
    /// The staged batch these hold; `None` when free.
    key: Option<u64>,
    decoded: DecodedBatch,
    pinned: Option<PinnedHostSlice<f32>>,
    device: Option<CudaSlice<f32>>,
}

/// Runs models on one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    models: ByModel<DeviceModel>,
    /// Uploads of staged batches run here, beside the compute on `stream`.
    copy_stream: Arc<CudaStream>,
    /// Two input slots: the running batch's and the next one's.
    inputs: [InputSlot; 2],
    /// The download target (plain pinned), kept from batch to batch and grown when needed.
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
        let copy_stream = ctx.new_stream().map_err(cuda_error("stream"))?;
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
            copy_stream,
            inputs: Default::default(),
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

impl CudaBackend {
    /// Decodes `batch` into input slot `slot` and queues its upload on `stream`; marks the
    /// slot as holding `batch.key`. Returns the batch's valid size.
    fn stage(&mut self, slot: usize, batch: Batch<'_>, stream: &Arc<CudaStream>) -> Result<usize, String> {
        let network = self.models.get(batch.model)?.network;
        let ctx = Arc::clone(self.stream.context());
        let input = &mut self.inputs[slot];
        input.key = None;
        input.decoded.decode(network, batch.inputs);
        let values = input.decoded.values.len();
        if values == 0 {
            input.key = Some(batch.key);
            return Ok(0);
        }
        // Both buffers, each allocated when missing or short (a failed batch may have lost
        // one of them).
        if input.pinned.as_ref().is_none_or(|p| p.len() < values)
            || input.device.as_ref().is_none_or(|d| d.len() < values)
        {
            let capacity = values.next_power_of_two();
            input.pinned = None;
            input.device = None;
            // SAFETY: plain f32s, written below before any read.
            input.pinned = Some(unsafe { ctx.alloc_pinned::<f32>(capacity) }.map_err(cuda_error("pinned"))?);
            input.device = Some(stream.alloc_zeros::<f32>(capacity).map_err(cuda_error("alloc"))?);
        }
        let (Some(pinned), Some(device)) = (input.pinned.as_mut(), input.device.as_mut()) else {
            return Err("the input buffers of this GPU could not be allocated".to_string());
        };
        // `as_mut_slice` first waits for this buffer's last upload (cudarc's event on it);
        // the copy into `device` waits for the last batch that read it (event tracking). It
        // moves the whole slot (under twice the batch: capacities are powers of two).
        pinned.as_mut_slice().map_err(cuda_error("pinned"))?[..values].copy_from_slice(&input.decoded.values);
        stream.memcpy_htod(pinned, device).map_err(cuda_error("upload"))?;
        input.key = Some(batch.key);
        Ok(input.decoded.len())
    }
}

impl Backend for CudaBackend {
    fn run(&mut self, model: u32, inputs: &[&[u8]], out: &mut BatchOutput) -> Result<(), String> {
        let current = Batch {
            key: u64::MAX,
            model,
            inputs,
        };
        self.run_then_stage(current, None, out)
    }

    /// The current batch runs from the input slot that staged it (its upload already done on
    /// the copy stream, or still finishing: the compute stream waits for it), else it is
    /// uploaded now on the compute stream. While the device computes, `next` is decoded into
    /// the other slot and uploaded on the copy stream.
    fn run_then_stage(
        &mut self,
        current: Batch<'_>,
        next: Option<Batch<'_>>,
        out: &mut BatchOutput,
    ) -> Result<(), String> {
        let network = self.models.get(current.model)?.network;
        let slot = match self.inputs.iter().position(|i| i.key == Some(current.key)) {
            Some(slot) => slot,
            None => {
                // Keep a staged batch that is still to come, if any.
                let slot = self.inputs.iter().position(|i| i.key.is_none()).unwrap_or(0);
                let stream = Arc::clone(&self.stream);
                self.stage(slot, current, &stream)?;
                slot
            }
        };
        self.inputs[slot].key = None;
        let batch = self.inputs[slot].decoded.len();
        if batch == 0 {
            self.inputs[slot].decoded.answer(network, current.inputs, &[], out);
            return Ok(());
        }
        let ctx = Arc::clone(self.stream.context());
        if self.pinned_out.as_ref().is_none_or(|p| p.len() < batch * OUTPUTS) {
            let capacity = (batch * OUTPUTS).next_power_of_two();
            // Not write-combined: the host reads it. SAFETY: plain f32s, written by the copy.
            self.pinned_out =
                Some(unsafe { ctx.alloc_pinned_with_flags::<f32>(capacity, 0) }.map_err(cuda_error("pinned"))?);
        }
        // Taken out while the batch runs (`forward` borrows `self`) and put back whatever
        // happens: a failed batch fails its plan, and the next batch finds its buffers.
        let (Some(device_in), Some(mut pinned_out)) = (self.inputs[slot].device.take(), self.pinned_out.take()) else {
            return Err("a CUDA buffer of this GPU is missing".to_string());
        };
        let outcome = self.compute(slot, current, next, network, batch, &device_in, &mut pinned_out, out);
        self.inputs[slot].device = Some(device_in);
        self.pinned_out = Some(pinned_out);
        outcome
    }
}

impl CudaBackend {
    /// The batch in input slot `slot` on the device, its logits answered into `out`, and
    /// `next` staged in the other slot meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &mut self,
        slot: usize,
        current: Batch<'_>,
        next: Option<Batch<'_>>,
        network: Network,
        batch: usize,
        device_in: &CudaSlice<f32>,
        pinned_out: &mut PinnedHostSlice<f32>,
        out: &mut BatchOutput,
    ) -> Result<(), String> {
        let start = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_error("event"))?;
        let device_model = self.models.get(current.model)?;
        let y = self.forward(device_model, device_in, batch)?;
        {
            // Exactly the logits: cudarc's `memcpy_dtoh` copies the whole (larger) pinned
            // buffer. The host reads them after the end event below, which follows the copy.
            let logits = &mut pinned_out.as_mut_slice().map_err(cuda_error("download"))?[..batch * OUTPUTS];
            let (src, _read) = y.device_ptr(&self.stream);
            // SAFETY: `y` holds `batch * OUTPUTS` f32s, and both stay alive until the copy
            // is done (`y` until the end event is waited on; the pinned buffer is ours).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(logits, src, self.stream.cu_stream()) }
                .map_err(cuda_error("download"))?;
        }
        let end = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_error("event"))?;
        // Not the current batch, and not one the other slot already holds.
        let already = self.inputs[1 - slot].key;
        if let Some(next) = next.filter(|n| n.key != current.key && already != Some(n.key)) {
            let copy = Arc::clone(&self.copy_stream);
            // A batch that cannot be staged is uploaded when it runs instead.
            if self.stage(1 - slot, next, &copy).is_err() {
                self.inputs[1 - slot].key = None;
            }
        }
        self.last_device_ms = start.elapsed_ms(&end).map_err(cuda_error("timing"))?;
        drop(y);
        let logits = &pinned_out.as_slice().map_err(cuda_error("download"))?[..batch * OUTPUTS];
        self.inputs[slot].decoded.answer(network, current.inputs, logits, out);
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

    /// Whether GPU 0 can run; says why not ("skipped: ...") when it cannot.
    fn gpu_present() -> bool {
        if let Err(message) = driver_check() {
            println!("skipped: no CUDA driver ({message})");
            return false;
        }
        if device_count() == 0 {
            println!("skipped: a CUDA driver but no GPU");
            return false;
        }
        true
    }

    #[test]
    fn cuda_matches_cpu() {
        if !gpu_present() {
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

    /// Staged batches give the same outputs as unstaged ones, a staged batch that does not
    /// come next is not used for the one that does, and the time of a run of batches with
    /// and without overlap is printed (the overlap's gain).
    #[test]
    fn staged_uploads_give_the_same_outputs() {
        if !gpu_present() {
            return;
        }
        let network = Network::ResNet;
        let weights = Weights::from_seed(network, 11);
        let mut cuda = CudaBackend::of_weights(0, &weights).expect("the cuda backend starts");
        let batches: Vec<Vec<Vec<u8>>> = (0..6u64)
            .map(|b| (0..8).map(|i| nets::sample_input(network, b * 100 + i)).collect())
            .collect();
        let views: Vec<Vec<&[u8]>> = batches.iter().map(|b| b.iter().map(Vec::as_slice).collect()).collect();
        let serial: Vec<BatchOutput> = views
            .iter()
            .map(|v| {
                let mut out = BatchOutput::default();
                cuda.run(0, v, &mut out).unwrap();
                out
            })
            .collect();
        let batch = |key: usize| Batch {
            key: key as u64,
            model: 0,
            inputs: &views[key],
        };
        // 0 stages 1, 1 stages 2, 2 stages 4 but 3 comes first (unstaged, staging nothing),
        // then 4 from the slot staged two batches ago, then 5.
        let order = [
            (0, Some(1)),
            (1, Some(2)),
            (2, Some(4)),
            (3, None),
            (4, Some(5)),
            (5, None),
        ];
        for (current, next) in order {
            let mut out = BatchOutput::default();
            cuda.run_then_stage(batch(current), next.map(batch), &mut out).unwrap();
            assert_eq!(out, serial[current], "batch {current} (staged next: {next:?})");
        }
        // The overlap's gain: the same batch of 64 one after another, serial and staged,
        // in alternating blocks (the median block of each is printed).
        for network in Network::ALL {
            let weights = Weights::from_seed(network, 12);
            let mut cuda = CudaBackend::of_weights(0, &weights).expect("the cuda backend starts");
            let big: Vec<Vec<u8>> = (0..64).map(|i| nets::sample_input(network, i)).collect();
            let big: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
            let (rounds, blocks) = (20u64, 7);
            let mut out = BatchOutput::default();
            let mut key = 0u64;
            let mut block = |staged: bool| {
                let started = std::time::Instant::now();
                for _ in 0..rounds {
                    out.clear();
                    key += 1;
                    let current = Batch {
                        key,
                        model: 0,
                        inputs: &big,
                    };
                    let next = Batch {
                        key: key + 1,
                        model: 0,
                        inputs: &big,
                    };
                    cuda.run_then_stage(current, staged.then_some(next), &mut out).unwrap();
                }
                key += 1;
                started.elapsed().as_secs_f64() * 1e6 / rounds as f64
            };
            block(false);
            let (mut serial, mut staged): (Vec<f64>, Vec<f64>) =
                (0..blocks).map(|_| (block(false), block(true))).unzip();
            serial.sort_by(f64::total_cmp);
            staged.sort_by(f64::total_cmp);
            let (serial_us, staged_us) = (serial[blocks / 2], staged[blocks / 2]);
            println!(
                "{network:?} batch 64, {blocks} blocks of {rounds}: {serial_us:.0} us a batch serial, {staged_us:.0} us \
                 with the next upload overlapped ({:.3}x)",
                serial_us / staged_us
            );
        }
    }
}
