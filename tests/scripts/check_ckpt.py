"""loom-ckpt end to end: inspect, export for torch.load and safetensors readers, import back bit-exact, bad input.

Usage: check_ckpt.py SCENARIO BUILD_DIR MPIEXEC
Scenarios:
  inspect        the manifest, config and tensor table of a fresh loom-train checkpoint
  torch          export --format torch: torch.load opens it, Hugging Face Llama names, the values of
                 state.bin; with --with-optimizer, import gives back the same state.bin and manifest
  safetensors    the same with --format safetensors, read by a plain reader written here from the
                 format's definition (8-byte length, JSON header, raw bytes)
  from_pytorch   a state_dict written by torch.save in Python (Hugging Face names) imports with --like
  bad_input      missing file, wrong format, misshapen / unknown / missing tensors: exit 2, a named
                 error, and no output written
Prints "PASS <scenario>" and exits 0, or names the failed check and exits 1.
"""
import atexit
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import torch

scenario, build, mpiexec = sys.argv[1], sys.argv[2], sys.argv[3]
ckpt_tool = os.path.join(build, "launch", "loom-ckpt")
train = os.path.join(build, "launch", "loom-train")
work = tempfile.mkdtemp(prefix="loom-ckpt-test-")
atexit.register(shutil.rmtree, work, ignore_errors=True)


def fail(message):
    print(f"FAIL {scenario}: {message}")
    sys.exit(1)


def run(args, expect=0):
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    print(f"$ {' '.join(args)}\n{result.stdout}--- exit {result.returncode}")
    if result.returncode != expect:
        fail(f"expected exit {expect}, got {result.returncode}")
    return result.stdout


def make_checkpoint():
    """Two steps of a tiny Llama-style hybrid (linear + softmax attention) at 2 ranks."""
    ckpt = os.path.join(work, "ckpt")
    run([mpiexec, "--oversubscribe", "-np", "2", train, "--set", "model.preset=tiny-linear-llama-hybrid",
         "--set", "data.task=mqar", "--set", "train.steps=2", "--set", "train.seq_len=64",
         "--set", "train.batch_size=2", "--set", f"train.checkpoint_dir={ckpt}"])
    steps = sorted(d for d in os.listdir(ckpt) if d.startswith("step-") and not d.endswith(".tmp"))
    if not steps:
        fail(f"loom-train wrote no checkpoint into {ckpt}")
    return os.path.join(ckpt, steps[-1])


def tensor_table(step_dir):
    """name -> (dtype, shape, bytes of state.bin), from loom-ckpt inspect."""
    out = run([ckpt_tool, "inspect", step_dir])
    table, reading = {}, False
    state = open(os.path.join(step_dir, "state.bin"), "rb").read()
    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "int64": torch.int64,
              "float16": torch.float16}
    offset = 0
    for line in out.splitlines():
        if line.startswith("tensors ("):
            reading = True
            continue
        if reading and line.startswith("  ") and not line.strip().startswith("name "):
            parts = line.split()
            name, dtype, nbytes = parts[0], parts[1], int(parts[-1])
            shape = json.loads(" ".join(parts[2:-1]))
            values = torch.frombuffer(bytearray(state[offset:offset + nbytes]), dtype=dtypes[dtype]).reshape(shape) \
                if nbytes else torch.empty(shape, dtype=dtypes[dtype])
            table[name] = values
            offset += nbytes
        elif reading and not line.startswith("  "):
            reading = False
    if offset != len(state):
        fail(f"the tensor table covers {offset} bytes of state.bin's {len(state)}")
    return table


def hf_expected(table):
    names = {}
    for name in table:
        if not name.startswith("model/"):
            continue
        n = name[len("model/"):]
        if n == "embedding.weight":
            hf = "model.embed_tokens.weight"
        elif n == "final_norm.weight":
            hf = "model.norm.weight"
        elif n == "head.weight":
            hf = "lm_head.weight"
        else:
            block, rest = n.split("_", 1)
            i = block[len("block"):]
            if rest == "mixer_norm.weight":
                hf = f"model.layers.{i}.input_layernorm.weight"
            elif rest == "mlp_norm.weight":
                hf = f"model.layers.{i}.post_attention_layernorm.weight"
            elif rest.startswith("mixer."):
                proj, kind = rest[len("mixer."):].split(".")
                hf = f"model.layers.{i}.self_attn.{proj}_proj.{kind}"
            else:
                proj = rest[len("mlp."):].split(".")[0]
                hf = f"model.layers.{i}.mlp.{proj}_proj.weight"
        names[hf] = name
    return names


def read_safetensors(path):
    data = open(path, "rb").read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    dtypes = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "I64": torch.int64,
              "F16": torch.float16, "U8": torch.uint8}
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = bytearray(data[8 + size + begin:8 + size + end])
        tensors[name] = torch.frombuffer(raw, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"]) if raw \
            else torch.empty(entry["shape"], dtype=dtypes[entry["dtype"]])
    return tensors, meta


def same_checkpoint(a, b):
    for f in ("state.bin", "manifest.pb"):
        if open(os.path.join(a, f), "rb").read() != open(os.path.join(b, f), "rb").read():
            fail(f"{f} of {b} differs from {a}: the round trip is not bit-exact")


def check_export(step_dir, fmt):
    table = tensor_table(step_dir)
    expected = hf_expected(table)
    out = os.path.join(work, f"model.{fmt}")
    run([ckpt_tool, "export", step_dir, "--format", fmt, "--output", out])
    if fmt == "torch":
        loaded = torch.load(out)
    else:
        loaded, meta = read_safetensors(out)
        if "loom.manifest" not in meta:
            fail("the safetensors metadata has no loom.manifest")
    if set(loaded) != set(expected):
        fail(f"exported names {sorted(loaded)} are not the Hugging Face names {sorted(expected)}")
    for hf, loom_name in expected.items():
        if not torch.equal(loaded[hf], table[loom_name]):
            fail(f"{hf} differs from {loom_name} in state.bin")
    print(f"{len(loaded)} tensors with Hugging Face names, equal to the checkpoint's: e.g. {sorted(loaded)[0]}")
    # The full export and back.
    full = os.path.join(work, f"full.{fmt}")
    run([ckpt_tool, "export", step_dir, "--format", fmt, "--output", full, "--with-optimizer"])
    imported = os.path.join(work, f"imported-{fmt}")
    run([ckpt_tool, "import", full, "--output", imported])
    steps = [d for d in os.listdir(imported) if d.startswith("step-")]
    same_checkpoint(step_dir, os.path.join(imported, steps[0]))
    print("round trip bit-exact: state.bin and manifest.pb identical")


def expect_refused(args, pattern, output):
    out = run(args, expect=2)
    if pattern not in out:
        fail(f"the message does not say {pattern!r}")
    written = os.listdir(output) if os.path.isdir(output) else os.path.exists(output)
    if written:
        fail(f"{output} was written although the command was refused")


if scenario == "inspect":
    step_dir = make_checkpoint()
    out = run([ckpt_tool, "inspect", step_dir])
    for needle in ("manifest: version", "step 2", "(verified)", "preset: \"tiny-linear-llama-hybrid\"",
                   "model/block0_mixer.q.weight", "optimizer/adamw/steps", "model parameters: "):
        if needle not in out:
            fail(f"inspect does not print {needle!r}")
    run([ckpt_tool, "inspect", os.path.dirname(step_dir)])  # the checkpoint directory: its latest
elif scenario in ("torch", "safetensors"):
    check_export(make_checkpoint(), scenario)
elif scenario == "from_pytorch":
    step_dir = make_checkpoint()
    table = tensor_table(step_dir)
    state_dict = {hf: table[name].clone() + 1 for hf, name in hf_expected(table).items()}  # new weights
    path = os.path.join(work, "pytorch_model.bin")
    torch.save(state_dict, path)
    imported = os.path.join(work, "from-pytorch")
    run([ckpt_tool, "import", path, "--output", imported, "--like", step_dir])
    steps = [d for d in os.listdir(imported) if d.startswith("step-")]
    back = tensor_table(os.path.join(imported, steps[0]))
    for hf, name in hf_expected(table).items():
        if not torch.equal(back[name], state_dict[hf]):
            fail(f"{name} is not the state_dict's {hf}")
    if any(n.startswith("optimizer/") for n in back):
        fail("a weights-only import must not invent optimizer state")
    print(f"imported {len(back)} tensors from torch.save's file, bit-exact")
elif scenario == "bad_input":
    step_dir = make_checkpoint()
    out_dir = os.path.join(work, "refused")
    expect_refused([ckpt_tool, "import", os.path.join(work, "nothing.bin"), "--output", out_dir],
                   "does not exist", out_dir)
    text = os.path.join(work, "notes.txt")
    open(text, "w").write("not a checkpoint\n")
    expect_refused([ckpt_tool, "import", text, "--output", out_dir],
                   "is neither a torch.save file (zip) nor a safetensors file", out_dir)
    table = tensor_table(step_dir)
    names = hf_expected(table)
    good = {hf: table[n].clone() for hf, n in names.items()}
    wrong_shape = dict(good)
    wrong_shape["model.norm.weight"] = torch.zeros(3)
    torch.save(wrong_shape, os.path.join(work, "wrong_shape.bin"))
    expect_refused([ckpt_tool, "import", os.path.join(work, "wrong_shape.bin"), "--output", out_dir, "--like", step_dir],
                   "tensor 'model.norm.weight' has shape [3]", out_dir)
    extra = dict(good)
    extra["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    torch.save(extra, os.path.join(work, "extra.bin"))
    expect_refused([ckpt_tool, "import", os.path.join(work, "extra.bin"), "--output", out_dir, "--like", step_dir],
                   "tensor(s) the model does not have: 'model.layers.9.mlp.up_proj.weight'", out_dir)
    missing = dict(good)
    del missing["model.embed_tokens.weight"]
    torch.save(missing, os.path.join(work, "missing.bin"))
    expect_refused([ckpt_tool, "import", os.path.join(work, "missing.bin"), "--output", out_dir, "--like", step_dir],
                   "no tensor for the model's parameter 'embedding.weight'", out_dir)
    expect_refused([ckpt_tool, "import", os.path.join(work, "missing.bin"), "--output", out_dir],
                   "carries no Loom manifest", out_dir)
    # model.state_dict() is an OrderedDict, which libtorch's C++ unpickler cannot read: a named hint.
    from collections import OrderedDict
    torch.save(OrderedDict(good), os.path.join(work, "ordered.bin"))
    expect_refused([ckpt_tool, "import", os.path.join(work, "ordered.bin"), "--output", out_dir, "--like", step_dir],
                   "torch.save(dict(model.state_dict()), path)", out_dir)
    # A run's directory that holds checkpoints is refused, and nothing in it moves.
    torch.save(good, os.path.join(work, "good.bin"))
    run_dir = os.path.dirname(step_dir)
    before = sorted(os.listdir(run_dir))
    out = run([ckpt_tool, "import", os.path.join(work, "good.bin"), "--output", run_dir, "--like", step_dir], expect=2)
    if "already holds" not in out:
        fail("an import into a run's directory is not refused by name")
    if sorted(os.listdir(run_dir)) != before:
        fail(f"the run's directory changed: {before} -> {sorted(os.listdir(run_dir))}")
    export_target = os.path.join(work, "exported.safetensors")
    expect_refused([ckpt_tool, "export", os.path.join(work, "no-such-ckpt"), "--format", "safetensors",
                    "--output", export_target], "does not exist", export_target)
    run([ckpt_tool, "export", step_dir, "--format", "pickle", "--output", export_target], expect=2)
else:
    fail(f"unknown scenario {scenario}")
print(f"PASS {scenario}")
