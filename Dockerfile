# megatron-moetion on NVIDIA's PyTorch container: Megatron-LM at the pinned ref with the
# MoEtion patches applied, and the megatron_moetion package installed.
#
#   docker build -t megatron-moetion .
#   docker run --gpus all --ipc=host -it megatron-moetion scripts/pretrain_gpt.sh --help
#
# The base image brings torch, Transformer Engine, Apex and NCCL; it is the one Megatron-LM's own
# CI uses at core_v0.19.0 (docker/.ngc_version.dev).
ARG NGC_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3
FROM ${NGC_IMAGE}

# Keep in step with patches/MEGATRON_LM_REF (tests/test_dockerfile.py checks it).
ARG MEGATRON_REPO=https://github.com/NVIDIA/Megatron-LM.git
ARG MEGATRON_REF=5be9626709af2722333bf54797c954c09edeada3

# The NGC image pins its Python environment through PIP_CONSTRAINT; Megatron's extras need it off.
ENV PIP_CONSTRAINT="" \
    MEGATRON_DIR=/workspace/Megatron-LM \
    PYTHONPATH=/workspace/Megatron-LM \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-moetion
COPY pyproject.toml README.md ./
COPY megatron_moetion ./megatron_moetion
COPY patches ./patches
COPY scripts ./scripts

# Megatron-LM at the pinned commit, patched with the same script CI runs (it refuses any other
# commit and fails naming the patch and file on a rejected hunk).
RUN git clone --quiet --filter=blob:none "${MEGATRON_REPO}" "${MEGATRON_DIR}" \
    && git -C "${MEGATRON_DIR}" checkout --quiet "${MEGATRON_REF}" \
    && bash scripts/apply_patches.sh "${MEGATRON_DIR}"

# torch, TE and Apex come from the base image; --no-build-isolation keeps pip from replacing them.
# "training" is the extra Megatron-LM's pyproject names for pretrain_gpt.py ("mlm" is deprecated);
# nvidia-resiliency-ext is the version Megatron-LM pins at the ref (its "dev" extra), for
# --inprocess-restart, --enable-ft-package / ft_launcher and local checkpoints.
ARG NVRX_VERSION=0.6.0
# The checks: the patched megatron.training is the one imported, and pretrain_gpt.py's parser
# takes the --moetion flags. (pretrain_gpt.py --help itself fails at this ref, in Megatron's
# own help text: the '%' in --moe-paged-stash-buffer-size-factor-cuda's.)
RUN pip install --no-cache-dir --no-build-isolation -e "${MEGATRON_DIR}[training]" \
        "nvidia-resiliency-ext==${NVRX_VERSION}" \
    && pip install --no-cache-dir --no-deps -e . \
    && python -c "import megatron.training.training as t, megatron_moetion.megatron_hooks as h; \
assert t.megatron_hooks is h, 'megatron.training is not the patched tree'; \
import nvidia_resiliency_ext.inprocess" \
    && python -c "import sys; sys.argv = ['pretrain_gpt.py', '--moetion', '--moetion-window', '3']; \
from megatron.training.arguments import parse_args; args = parse_args(); \
assert args.moetion and args.moetion_window == 3, 'the patched parser lacks --moetion'" \
    && bash scripts/pretrain_gpt.sh --dry-run > /dev/null \
    && bash scripts/pretrain_gpt.sh --help > /dev/null

CMD ["bash"]
