"""GPU kernel audit: which ops of an inference graph would leave the GPU, found without a GPU.

TensorFlow places an op on the GPU only if a GPU kernel is registered for the op *and* its dtypes; otherwise, with
soft placement (which both backends use), the op silently runs on the CPU and its inputs and outputs cross PCIe on
every call. The CUDA build of the TensorFlow wheel (the one this project installs) registers its GPU kernels even on
a machine without a GPU, so the kernel registry (``tensorflow.python.framework.kernels``) answers the question on
any machine: this module walks every op that one inference call would run (the outputs' transitive inputs, through
nested and XLA-compiled functions) and looks each one up.

What it reports (:class:`GpuAuditReport`):

* ``cpu_only``: ops without a GPU kernel for their dtypes (device types ``GPU`` and ``DEFAULT``; the latter are
  TensorFlow's kernels for every non-CPU device). These are the ops to replace.
* ``xla_uncompilable``: ops inside an XLA-compiled function (``jit_compile=True``) without an ``XLA_GPU_JIT``
  kernel; XLA refuses to compile such a function on the GPU.
* ``host_by_design``: what stays on the host on purpose, with the reason: the numpy / OpenCV stages around the graph
  (resize, mask paste, encoding), and ops whose GPU kernel keeps every tensor in host memory (TensorFlow's
  convention for int32: shape arithmetic, labels, permutations), counted where they read a tensor that a GPU kernel
  left in device memory (a device-to-host copy each).

The registry is what TensorFlow's placer consults, so the audit is exact about kernels; it cannot see what only a
real device shows (memory, speed, cuDNN algorithm choice). ``benchmarks/gpu_check.sh`` measures those on a GPU.
"""

from __future__ import annotations

import functools
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, kernel_def_pb2, op_def_pb2
from tensorflow.python.framework import kernels, op_def_registry

if TYPE_CHECKING:
    from maskrcnn_serving.backends.base import Backend

GPU_DEVICE_TYPES = ("GPU", "DEFAULT")
XLA_GPU_DEVICE_TYPE = "XLA_GPU_JIT"
# Call ops: what they run is audited through the called function (they have GPU kernels of their own).
_FUNCTION_ATTRS = ("f", "then_branch", "else_branch", "cond", "body", "branches")
# Frames of these packages say where an op comes from (the innermost one wins).
PROJECT_PACKAGES = ("maskrcnn_serving", "tensorpack")

# Work of the serving path that runs outside the graph, on the host, by design (op -> reason).
HOST_STAGES: dict[str, str] = {
    "resize_image (OpenCV, before the graph)": (
        "tensorpack's resize is cv2.resize on uint8 pixels; done on the host so that the answers stay bit-identical "
        "to the training framework's, and the graph receives the small resized image instead of the decoded photo"
    ),
    "paste masks + encode (numpy, after the graph)": (
        "28x28 probabilities pasted per box at box size and encoded to RLE / polygons directly (never full-size "
        "masks); the graph only returns the 28x28 masks, so the device-to-host copy is 3 KB per detection"
    ),
}
HOST_MEMORY_REASON = (
    "TensorFlow's GPU kernel for {dtypes} keeps all inputs and outputs in host memory (its convention for int32); "
    "{count} op(s), {copies} of which read a tensor a GPU kernel computed (a small device-to-host copy each: "
    "{places})"
)


@dataclass(frozen=True)
class OpSite:
    """One op that an inference call runs: its type, its dtype attributes, where it comes from, how it runs."""

    op_type: str
    dtypes: tuple[str, ...]  # "attr=dtype" of the op's type attributes, sorted
    where: str  # "path/file.py:line function" of the innermost project frame, else the enclosing function
    xla: bool  # inside an XLA-compiled function
    attrs: Mapping[str, attr_value_pb2.AttrValue] = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class AuditFinding:
    """Ops of one type and dtypes caught by one check (no kernel, or a device-to-host read), and where they come
    from (at most five places, the most frequent first)."""

    op: str
    dtypes: tuple[str, ...]
    count: int
    where: tuple[str, ...]

    def to_json(self) -> dict:
        return {"op": self.op, "dtypes": list(self.dtypes), "count": self.count, "where": list(self.where)}


@dataclass(frozen=True)
class HostOp:
    """Something that stays on the host on purpose, and why."""

    op: str
    reason: str

    def to_json(self) -> dict:
        return {"op": self.op, "reason": self.reason}


@dataclass
class GpuAuditReport:
    """The audit of one inference graph (see the module docstring)."""

    backend: str
    precision: str
    ops_total: int
    xla: bool = False
    cpu_only: list[AuditFinding] = field(default_factory=list)
    xla_uncompilable: list[AuditFinding] = field(default_factory=list)
    host_by_design: list[HostOp] = field(default_factory=list)
    # Ops that run on the host (int32 kernels in host memory) and read a tensor from device memory.
    device_to_host: list[AuditFinding] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """True when every op has a GPU kernel (and, under XLA, an XLA GPU kernel)."""
        return not self.cpu_only and not self.xla_uncompilable

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "ops_total": self.ops_total,
            "cpu_only": [f.to_json() for f in self.cpu_only],
            "host_by_design": [h.to_json() for h in self.host_by_design],
            "xla": self.xla,
            "xla_uncompilable": [f.to_json() for f in self.xla_uncompilable],
            "device_to_host": [f.to_json() for f in self.device_to_host],
            **self.details,
        }


# ------------------------------------------------------------------------------------------------ kernel registry


@functools.cache
def _kernels_for_op(op_type: str) -> tuple[kernel_def_pb2.KernelDef, ...]:
    return tuple(kernels.get_registered_kernels_for_op(op_type).kernel)


@functools.lru_cache(maxsize=1)
def register_xla_kernels() -> None:
    """Make the registry list XLA's compilation kernels (``XLA_GPU_JIT``, ``XLA_CPU_JIT``).

    TensorFlow registers them lazily, the first time it compiles something; compiling one tiny function does it."""
    tf.function(lambda x: x + 1, jit_compile=True)(tf.constant([0.0]))
    _kernels_for_op.cache_clear()


def _constraint_holds(constraint: kernel_def_pb2.KernelDef.AttrConstraint, value: attr_value_pb2.AttrValue) -> bool:
    allowed = constraint.allowed_values.list
    if allowed.type:
        types = list(value.list.type) if value.HasField("list") else [value.type]
        return all(t in allowed.type for t in types)
    if allowed.s:
        return value.s in allowed.s
    if allowed.i:
        return value.i in allowed.i
    if allowed.b:
        return value.b in allowed.b
    return True


def _with_defaults(op_type: str, attrs: Mapping[str, attr_value_pb2.AttrValue]) -> dict:
    """The node's attributes plus the op's defaults for any it leaves out (kernel constraints may name them)."""
    full = dict(attrs)
    op_def = op_def_registry.get(op_type)
    if op_def is not None:
        for attr in op_def.attr:
            if attr.name not in full and attr.HasField("default_value"):
                full[attr.name] = attr.default_value
    return full


def find_kernel(
    op_type: str, attrs: Mapping[str, attr_value_pb2.AttrValue], device_types: Sequence[str] = GPU_DEVICE_TYPES
) -> kernel_def_pb2.KernelDef | None:
    """The registered kernel that TensorFlow would pick for an op with these attributes on one of
    ``device_types``, or None. Labelled kernels are only for nodes that ask for their label (``_kernel``)."""
    attrs = _with_defaults(op_type, attrs)
    label = attrs["_kernel"].s.decode() if "_kernel" in attrs else ""
    for kernel in _kernels_for_op(op_type):
        if kernel.device_type not in device_types or kernel.label != label:
            continue
        if all(c.name in attrs and _constraint_holds(c, attrs[c.name]) for c in kernel.constraint):
            return kernel
    return None


def _arg_positions(
    op_def: op_def_pb2.OpDef, attrs: Mapping[str, attr_value_pb2.AttrValue], outputs: bool
) -> dict[str, range]:
    """Argument name -> the input (or output) positions it covers (list arguments span several)."""
    positions, start = {}, 0
    for arg in op_def.output_arg if outputs else op_def.input_arg:
        if arg.number_attr:
            size = attrs[arg.number_attr].i
        elif arg.type_list_attr:
            size = len(attrs[arg.type_list_attr].list.type)
        else:
            size = 1
        positions[arg.name] = range(start, start + size)
        start += size
    return positions


def host_memory_positions(
    op_type: str, attrs: Mapping[str, attr_value_pb2.AttrValue], kernel: kernel_def_pb2.KernelDef
) -> tuple[frozenset[int], frozenset[int]]:
    """(input positions, output positions) that ``kernel`` keeps in host memory."""
    op_def = op_def_registry.get(op_type)
    if op_def is None:
        return frozenset(), frozenset()
    attrs = _with_defaults(op_type, attrs)
    host = set(kernel.host_memory_arg)
    found = []
    for outputs in (False, True):
        spans = _arg_positions(op_def, attrs, outputs)
        found.append(frozenset(i for name, span in spans.items() if name in host for i in span))
    return found[0], found[1]


# ------------------------------------------------------------------------------------------------ graph walking


def _where(op: tf.Operation, function_name: str) -> str:
    """The innermost frame of this project (or tensorpack) that created ``op``, else the function's name."""
    for frame in reversed(op.traceback or []):
        parts = frame.filename.replace(os.sep, "/").split("/")
        for package in PROJECT_PACKAGES:
            if package in parts:
                relative = "/".join(parts[parts.index(package) :])
                return f"{relative}:{frame.lineno} {frame.name}"
    return function_name or "graph"


def _dtypes(attrs: Mapping[str, attr_value_pb2.AttrValue]) -> tuple[str, ...]:
    found = []
    for name, value in attrs.items():
        if name.startswith("_"):
            continue
        if value.HasField("type"):
            found.append(f"{name}={tf.as_dtype(value.type).name}")
        elif value.HasField("list") and value.list.type:
            found.append(f"{name}=[{','.join(tf.as_dtype(t).name for t in value.list.type)}]")
    return tuple(sorted(found))


def _called_functions(op: tf.Operation) -> list[str]:
    names = []
    for attr in _FUNCTION_ATTRS:
        value = op.node_def.attr.get(attr)
        if value is None:
            continue
        if value.HasField("func"):
            names.append(value.func.name)
        names += [f.name for f in value.list.func]
    return names


def _function_graph(graph: tf.Graph, name: str) -> tuple[tf.Graph, bool]:
    """The traced graph of the library function ``name`` and whether it is XLA-compiled.

    Uses the graph's function registry (``_get_function``: private, but the only way to the nested functions'
    Python graphs, which carry the tracebacks that say where each op comes from)."""
    function = graph._get_function(name)
    if function is None or getattr(function, "graph", None) is None:
        raise ValueError(f"function {name} is not traced in this process; audit a freshly traced function")
    definition = function.definition
    must_compile = "_XlaMustCompile" in definition.attr and definition.attr["_XlaMustCompile"].b
    return function.graph, must_compile


def _reachable(outputs: Iterable[tf.Operation]) -> list[tf.Operation]:
    """Ops that computing ``outputs`` runs: their transitive data and control inputs (graph order)."""
    seen: dict[str, tf.Operation] = {}
    stack = list(outputs)
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen[op.name] = op
        stack += [t.op for t in op.inputs] + list(op.control_inputs)
    return list(seen.values())


def _ops_and_sites(
    graph: tf.Graph, outputs: Sequence[tf.Operation], xla: bool, function_name: str
) -> Iterator[tuple[tf.Operation, OpSite]]:
    arguments = {t.op.name for t in getattr(graph, "inputs", [])}  # a function's arguments are not ops
    for op in _reachable(outputs):
        if op.name in arguments:
            continue
        attrs = op.node_def.attr
        called = _called_functions(op)
        site = OpSite(op.type, _dtypes(attrs), _where(op, function_name), xla, attrs)
        yield op, site
        for name in called:
            inner, must_compile = _function_graph(graph, name)
            inner_outputs = [t.op for t in inner.outputs] + list(getattr(inner, "control_outputs", []))
            yield from _ops_and_sites(inner, inner_outputs, xla or must_compile, name)


def collect_op_sites(graph: tf.Graph, outputs: Sequence[tf.Tensor | tf.Operation]) -> list[tuple[tf.Operation, OpSite]]:
    """Every op that evaluating ``outputs`` of ``graph`` runs, through called (and XLA-compiled) functions, each with
    its :class:`OpSite`. ``graph`` may be a ``tf.Graph`` (TF1 session graph) or a concrete function's graph."""
    ops = [o.op if isinstance(o, tf.Tensor) else o for o in outputs]
    return list(_ops_and_sites(graph, ops, False, getattr(graph, "name", "") or ""))


def _constant_expressions(ops: Iterable[tf.Operation]) -> set[tf.Operation]:
    """The ops whose value is fixed when the graph is built (constants and stateless ops of constants only)."""
    constant: dict[tf.Operation, bool] = {}
    expanded: set[tf.Operation] = set()  # inputs pushed once: a loop (TF1 while) cannot spin

    def is_constant(op: tf.Operation) -> bool:
        stack = [op]
        while stack:
            current = stack[-1]
            if current in constant:
                stack.pop()
                continue
            pending = [t.op for t in current.inputs if t.op not in constant]
            if pending and current.type != "Const" and current not in expanded:
                expanded.add(current)
                stack += pending
                continue
            stack.pop()
            constant[current] = current.type == "Const" or (
                bool(current.inputs)
                and not current.op_def.is_stateful
                and not current.control_inputs
                and all(constant.get(t.op, False) for t in current.inputs)
            )
        return constant[op]

    return {op for op in ops if is_constant(op)}


# ------------------------------------------------------------------------------------------------ the audit


def _findings(sites: Iterable[OpSite], max_places: int = 5) -> list[AuditFinding]:
    groups: dict[tuple[str, tuple[str, ...]], list[OpSite]] = defaultdict(list)
    for site in sites:
        groups[(site.op_type, site.dtypes)].append(site)
    findings = []
    for (op_type, dtypes), members in sorted(groups.items()):
        places = [where for where, _ in Counter(m.where for m in members).most_common(max_places)]
        findings.append(AuditFinding(op_type, dtypes, len(members), tuple(places)))
    return findings


def audit_graph(
    graph: tf.Graph,
    outputs: Sequence[tf.Tensor | tf.Operation],
    backend: str,
    precision: str,
    host_stages: Mapping[str, str] | None = None,
) -> GpuAuditReport:
    """Audit the ops that evaluating ``outputs`` runs (see the module docstring). ``host_stages``: the work outside
    the graph that stays on the host, reported under ``host_by_design`` (default :data:`HOST_STAGES`)."""
    pairs = collect_op_sites(graph, outputs)
    if any(site.xla for _, site in pairs):
        register_xla_kernels()
    cpu_only, uncompilable = [], []
    # Output positions that each GPU-placed op keeps in host memory (ops absent here run under XLA or nowhere).
    output_on_host: dict[tf.Operation, frozenset[int]] = {}
    host_only: list[tuple[tf.Operation, OpSite]] = []
    for op, site in pairs:
        if site.xla:
            if find_kernel(site.op_type, site.attrs, (XLA_GPU_DEVICE_TYPE,)) is None:
                uncompilable.append(site)
            continue
        if _called_functions(op):
            # A function call's results follow TensorFlow's default for functions on a GPU: int32 in host memory.
            output_on_host[op] = frozenset(i for i, t in enumerate(op.outputs) if t.dtype == tf.int32)
            continue
        kernel = find_kernel(site.op_type, site.attrs)
        if kernel is None:
            cpu_only.append(site)
            continue
        host_inputs, host_outputs = host_memory_positions(site.op_type, site.attrs, kernel)
        output_on_host[op] = host_outputs
        if len(host_inputs) == len(op.inputs) and len(host_outputs) == len(op.outputs):
            host_only.append((op, site))

    # A host-memory op reads device memory when one of its inputs is a device-memory output of a GPU-placed op,
    # unless that output is a constant expression, which Grappler folds into a (host) constant before running.
    folded = _constant_expressions(op for op, _ in pairs)
    reading_device: list[OpSite] = []
    totals: Counter[tuple[str, tuple[str, ...]]] = Counter()
    for op, site in host_only:
        totals[(site.op_type, site.dtypes)] += 1
        for tensor in op.inputs:
            producer = tensor.op
            if producer in folded:
                continue
            if producer in output_on_host and tensor.value_index not in output_on_host[producer]:
                reading_device.append(site)
                break
    device_to_host = _findings(reading_device)
    stages = HOST_STAGES if host_stages is None else host_stages
    host_by_design = [HostOp(name, reason) for name, reason in stages.items()]
    for finding in device_to_host:
        reason = HOST_MEMORY_REASON.format(
            dtypes=", ".join(finding.dtypes), count=totals[(finding.op, finding.dtypes)], copies=finding.count,
            places="; ".join(finding.where),
        )
        host_by_design.append(HostOp(finding.op, reason))
    copied = {(f.op, f.dtypes) for f in device_to_host}
    shape_ops = sum(count for key, count in totals.items() if key not in copied)
    if shape_ops:
        host_by_design.append(HostOp(
            "int32 shape arithmetic",
            f"{shape_ops} ops whose GPU kernels keep int32 in host memory and read only shapes, constants and other "
            "host tensors: no device copy",
        ))
    return GpuAuditReport(
        backend=backend,
        precision=precision,
        ops_total=len(pairs),
        xla=any(site.xla for _, site in pairs),
        cpu_only=_findings(cpu_only),
        xla_uncompilable=_findings(uncompilable),
        host_by_design=host_by_design,
        device_to_host=device_to_host,
    )


# ------------------------------------------------------------------------------------------------ the backends


def load_backend_for_gpu(
    backend_name: str,
    model_dir: str | os.PathLike | None,
    precision: str | None = None,
    xla: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> Backend:
    """The backend configured as it would be on a GPU machine, whatever this machine has: for ``optimized``,
    ``mixed`` precision means float16 and ``MASKRCNN_WINOGRAD=auto`` means no Winograd (cuDNN picks its own
    algorithms); settings not given come from ``environ`` (default ``os.environ``: ``MASKRCNN_XLA`` etc.)."""
    from maskrcnn_serving.backends.base import get_backend_class
    from maskrcnn_serving.model_dir import load_model_dir
    from maskrcnn_serving.settings import Settings

    bundle = load_model_dir(model_dir, environ)
    if backend_name == "optimized":
        from maskrcnn_serving.backends.optimized import OptimizedBackend

        settings = Settings.from_env(os.environ if environ is None else environ, precision=precision, xla=xla)
        return OptimizedBackend.from_bundle(bundle, settings, for_gpu=True)
    if precision not in (None, "float32"):
        raise ValueError(f"the {backend_name} backend computes in float32 only, not {precision}")
    return get_backend_class(backend_name).from_bundle(bundle)


def audit_backend(backend: Backend, batch_size: int = 1) -> GpuAuditReport:
    """Audit the graph one ``predict`` call of ``backend`` runs: for ``optimized``, the traced concrete function of
    ``detect_function(with_embeddings=True)`` (one graph for every batch size, with its nested and XLA-compiled
    functions: every op a request may run); for ``tensorpack``, its session graph from every fetchable output back."""
    if backend.name == "optimized":
        function = backend.detect_function(with_embeddings=True)  # every op a request may run
        outputs = list(function.graph.outputs) + list(function.graph.control_outputs)
        report = audit_graph(function.graph, outputs, "optimized", backend.network.compute_dtype.name)
        report.details["batch_size"] = batch_size
        report.details["winograd"] = backend.network.winograd
        return report
    if backend.name == "tensorpack":
        graph, outputs = backend.inference_graph
        return audit_graph(graph, outputs, "tensorpack", "float32")
    raise ValueError(f"no GPU audit for the {backend.name!r} backend")
