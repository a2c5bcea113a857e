"""The build finds a usable CUDA toolkit by itself (tools/cuda_toolkit.py), and build_info()
names the machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import cifarnet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cuda_toolkit  # noqa: E402


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_toolkit(root: Path, version: str = "13.0", *, headers=True, cudart=True) -> Path:
    """A folder shaped like a CUDA toolkit whose nvcc answers --version and --dryrun as the
    real one does."""
    executable(
        root / "bin" / "nvcc",
        "#!/bin/sh\n"
        'case "$*" in *--dryrun*) echo "#\\$ _HERE_=' + str(root / "bin") + '" >&2 ;; '
        f'*) echo "Cuda compilation tools, release {version}, V{version}.1" ;; esac\n',
    )
    if headers:
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    if cudart:
        (root / "lib64").mkdir(parents=True, exist_ok=True)
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_a_wrapper_script_resolves_to_the_toolkit_it_runs(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = executable(tmp_path / "usr" / "bin" / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert cuda_toolkit.nvcc_root(str(wrapper)) == str(toolkit)


def test_folders_without_headers_or_cudart_are_refused_with_the_reason(tmp_path):
    no_cudart = fake_toolkit(tmp_path / "a", cudart=False)
    no_headers = fake_toolkit(tmp_path / "b", headers=False)
    complete = fake_toolkit(tmp_path / "c")
    search = cuda_toolkit.find_cuda_toolkit("13", [str(tmp_path / "missing"), str(no_cudart), str(no_headers), str(complete)])
    assert search.root == str(complete) and search.version == "13.0"
    assert "no libcudart" in search.refused[str(no_cudart)]
    assert "no include/cuda_runtime.h" in search.refused[str(no_headers)]
    assert "no bin/nvcc" in search.refused[str(tmp_path / "missing")]


def test_a_toolkit_of_another_major_version_is_refused(tmp_path):
    old = fake_toolkit(tmp_path / "cuda-12.8", "12.8")
    search = cuda_toolkit.find_cuda_toolkit("13", [str(old)])
    assert search.root is None
    assert str(old) in search.explain() and "CUDA 12.8, torch was built with CUDA 13.x" in search.explain()


def test_cuda_home_is_tried_first_and_the_path_guess_is_resolved(tmp_path, monkeypatch):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    other = fake_toolkit(tmp_path / "cuda-home")
    executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_HOME", str(other))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert cuda_toolkit.candidate_roots()[:2] == [str(other), str(toolkit)]
    monkeypatch.delenv("CUDA_HOME")
    # torch's guess, the wrapper's grandparent, is a candidate too but has no toolkit
    assert cuda_toolkit.find_cuda_toolkit("13").root == str(toolkit)


def run_setup(env_changes: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_build_for_every_gpu_target_says_so_first_and_how_to_shorten_it():
    search = cuda_toolkit.find_cuda_toolkit(cuda_toolkit.torch_cuda_major())
    if search.root is None:
        pytest.skip(f"no usable CUDA toolkit here ({search.explain()})")
    env = {key: value for key, value in os.environ.items() if key not in ("TORCH_CUDA_ARCH_LIST", "CIFARNET_CUDA")}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the build compiles for its targets only")
    arch_list = cuda_toolkit.arch_list_of(cuda_toolkit.torch_cuda_arch_names())
    cuda_files = len(list((ROOT / "csrc").rglob("*.cu")))
    notice = cuda_toolkit.all_targets_notice(cuda_files, arch_list)
    assert notice in result.stdout.splitlines()
    assert f"all {len(arch_list.split(';'))} GPU targets" in notice and f"the {cuda_files} CUDA files" in notice
    assert "TORCH_CUDA_ARCH_LIST=" in notice and "CIFARNET_CUDA=0" in notice


def test_torch_cuda_arch_names_also_without_a_visible_gpu(monkeypatch):
    """torch 2.11's get_arch_list() answers [] where no GPU is visible; the build then reads the
    targets torch was compiled for from its own flags (or it would stop and ask for a variable)."""
    import torch

    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
    if not flags:
        pytest.skip("torch is a CPU build")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    assert cuda_toolkit.torch_cuda_arch_names() == flags.split()


@pytest.mark.parametrize(
    "names, expected",
    [
        (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),
        (["sm_90", "sm_80", "sm_90a"], "8.0;9.0+PTX;9.0a"),
        (["compute_90"], None),
        ([], None),
    ],
)
def test_the_default_gpu_targets_are_torchs_own(names, expected):
    assert cuda_toolkit.arch_list_of(names) == expected


def test_setup_refuses_an_unknown_cifarnet_cuda_value():
    result = run_setup({"CIFARNET_CUDA": "yes"})
    assert result.returncode != 0
    assert "CIFARNET_CUDA must be 0, 1 or unset, got 'yes'" in result.stderr


def test_setup_without_cuda_says_nothing_about_a_toolkit():
    result = run_setup({"CIFARNET_CUDA": "0"})
    assert result.returncode == 0, result.stderr
    assert "cifarnet:" not in result.stdout + result.stderr


def test_build_info_names_the_cpu():
    info = cifarnet.build_info()["cpu"]
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert ("AVX2" in info["isa"]) == ("avx2" in flags)
    assert ("AVX-512" in info["isa"]) == ("avx512f" in flags)
    assert ("AVX512-BF16" in info["isa"]) == ("avx512_bf16" in flags)
    assert ("AMX-BF16" in info["isa"]) == ("amx_bf16" in flags)
    assert info["model"]


def test_ci_runs_the_readmes_test_command_word_for_word():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Run the whole test suite"):]
    command = section[section.index("```bash\n") + len("```bash\n"):section.index("\n```")]
    assert "CUDA_HOME" not in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci and "CUDA_HOME" not in ci


def torch_cmake_prefix() -> Path | None:
    import torch.utils

    prefix = Path(torch.utils.cmake_prefix_path)
    return prefix if (prefix / "Torch" / "TorchConfig.cmake").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on PATH")
@pytest.mark.skipif(torch_cmake_prefix() is None, reason="this torch has no CMake package (torch/share/cmake)")
def test_cmake_configures_without_an_unsafe_runtime_search_path(tmp_path):
    """The configure step of the C++ suite (tools/run_tests.sh), into a folder of its own. The
    warning "Cannot generate a safe runtime search path" means two folders of the runtime search
    path hold a library of the same name (e.g. libgomp.so.1 in torch's lib folder and the
    compiler's), so the library linked may not be the one loaded."""
    cuda_root = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_toolkit.py")], capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), *generator,
         f"-DCMAKE_PREFIX_PATH={torch_cmake_prefix()}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Cannot generate a safe runtime search path" not in result.stderr, result.stderr
