#!/usr/bin/env bash
# Make the config folder for Qwen-Agent + a local vLLM on the same GPU:
#   bash examples/qwen_agent/make_configs.sh ~/mcp-sdxl-configs
# = a copy of configs/ with this folder's lease.yaml (vLLM sleep mode, GPU back after every render) and
# server.job_budget_s raised to an hour: the agent's LLM sleeps while SDXL renders, so it could not poll
# get_job; a generation call blocks until its images are ready instead of returning a job id.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest=${1:?usage: make_configs.sh DEST_FOLDER}
mkdir -p "$dest"
cp -r "$repo/configs/." "$dest/"
cp "$here/lease.yaml" "$dest/lease.yaml"
sed -i.bak -E 's/^(  job_budget_s:)[[:space:]]*[0-9.]+/\1 3600/' "$dest/sdxl_config.yaml"
rm -f "$dest/sdxl_config.yaml.bak"
grep -qE '^  job_budget_s: 3600( |$)' "$dest/sdxl_config.yaml" || { echo "could not set server.job_budget_s" >&2; exit 1; }
echo "$dest"
