"""The host description a training log starts with (CPU timings depend on the SIMD width)."""

from gms_jax import run_metadata


def _cpuinfo(tmp_path, flags):
  text = "".join(
    f"processor\t: {i}\nmodel name\t: Test CPU 9000\ncpu MHz\t\t: 2596.146\nflags\t\t: {flags}\n\n"
    for i in range(2)
  )
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  return str(path)


def test_cpu_info_reads_model_clock_and_widest_simd(tmp_path):
  avx512 = run_metadata.cpu_info(_cpuinfo(tmp_path, "fpu sse2 avx fma avx2 avx512f avx512bw"))
  assert avx512["model"] == "Test CPU 9000" and avx512["mhz"] == 2596.146
  assert avx512["simd"] == "avx512" and avx512["cores"] >= 1
  assert run_metadata.cpu_info(_cpuinfo(tmp_path, "fpu sse2 avx fma avx2"))["simd"] == "avx2"
  assert run_metadata.cpu_info(_cpuinfo(tmp_path, "fpu sse2 avx"))["simd"] == "other"
  missing = run_metadata.cpu_info(str(tmp_path / "absent"))
  assert missing["model"] == "" and missing["simd"] == "" and missing["mhz"] == 0.0


def test_describe_host_is_one_line():
  line = run_metadata.describe_host()
  assert "\n" not in line and "cores" in line
