"""Fused CPU kernels for the decoder's element-wise chains (SwiGLU, the RMS norm), built once per machine.

On a CPU a decoder step's matmuls run near the machine's peak; what is left is element-wise passes
that each stream their tensors through memory (about a third of the benchmark decoder's step on an
AMX Xeon, docs/benchmarks.md). ``cpu_fused.cpp`` does SwiGLU and the RMS norm, forward and backward,
in one pass each. ``build`` compiles it with torch's extension builder (ninja and a C++ compiler) into
a per-user cache, keyed on the source, torch, Python and the CPU's vector width; ``ops`` loads it and
wraps it in autograd functions. ``hardware.cpu_fused_kernels`` decides: auto (use them when built),
true (build them if missing), false.
"""
