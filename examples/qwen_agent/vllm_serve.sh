#!/usr/bin/env bash
# Start vLLM in sleep mode for the Qwen-Agent example (same GPU as mcp-sdxl).
#   --enable-sleep-mode + VLLM_SERVER_DEV_MODE=1: exposes POST /sleep, POST /wake_up, GET /is_sleeping,
#     which mcp-sdxl's lease (lease.yaml: backend vllm) calls around each generation.
#   --gpu-memory-utilization: leave room for the CUDA contexts; while vLLM sleeps SDXL needs ~12.3 GiB.
# No --tool-call-parser is needed: Qwen-Agent puts the tools in the prompt and parses <tool_call> itself.
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3-8B}
export VLLM_SERVER_DEV_MODE=1
exec vllm serve "$MODEL" \
  --host 127.0.0.1 --port "${PORT:-8000}" \
  --enable-sleep-mode \
  --gpu-memory-utilization "${GPU_UTIL:-0.85}" \
  --max-model-len "${MAX_LEN:-32768}"
