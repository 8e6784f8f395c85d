"""Backend registry: which implementations of the DFS ops exist, which can run on a device, and
what ``backend="auto"`` picks.

A backend is an object with six methods taking validated arguments (``dfs_kernels.functional``):
``partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels)``,
``partitioned_conv2d_with_exit_pool(...)`` (the same arguments),
``partitioned_linear(input, weight, bias, shared_features)``, ``reroute(x, shared_channels, dim)``,
``exit_reference(x, shared_channels, dim)`` and ``exit_avg_pool(x, shared_channels, dim)``, and a ``name``.

Backends:
- ``"reference"``: the literal eager oracle (``dfs_kernels.reference``), always available.
- ``"aten"``: oneDNN / cuDNN convolutions with the DFS glue of the compiled library (csrc/).
- ``"triton"``: Triton kernels (``dfs_kernels.backends.triton``) on CUDA; on CPU only under the
  Triton interpreter (``TRITON_INTERPRET=1`` before the backend is first used), which is for tests
  and debugging: it is available on explicit request but never listed by ``available_backends``
  (unless ``include_interpreted=True``) nor chosen by ``"auto"``. Triton is imported only once the
  backend is asked for on a device where it can run.
- ``"cudnn"``: the compiled library's cuDNN ops (``dfs_kernels.backends.cudnn``): cuDNN writes the
  shared channels' input gradient in place into the full-size gradient. CUDA tensors only, and only
  where the library was built with CUDA and cuDNN.

The compiled backends are ``dfs_kernels.ops.OpSet``s: each calls its registered ops, whose fakes and
autograd formulas are written once per op family (``dfs_kernels.ops``).

``"auto"``: on CPU, the first available of ("aten", "reference"). On CUDA, with a single candidate
that one; with several (aten, cudnn, triton) the measured choice per call
(``dfs_kernels.backends.auto``).
"""

from __future__ import annotations

import logging

import torch

from .. import _library, ops
from . import auto
from ._errors import BackendUnavailableError
from ._triton_availability import import_triton_backend, triton_interpreted, triton_state
from .auto import AUTO_MARGIN, MeasuredAuto, auto_choices
from .reference import OPS as _REFERENCE_OPS

__all__ = [
    "AUTO_MARGIN", "BACKENDS", "BackendUnavailableError", "MeasuredAuto", "auto_choices", "available_backends",
    "check_backend_name", "implementation", "register_flop_formulas", "resolve_backend", "unavailable_reason",
]

logger = logging.getLogger("dfs_kernels")

BACKENDS = ("reference", "aten", "triton", "cudnn")
"""Every backend name the package knows, available or not."""

_AUTO_PREFERENCE = ("aten", "cudnn", "triton", "reference")

_OP_SETS: dict[str, object] = {"reference": _REFERENCE_OPS}  # backend name -> its ops, once loaded
_MEASURED_AUTO = {"cuda": MeasuredAuto(device_type="cuda")}  # "auto" where several backends can run
_AUTO_CHOICES: dict[str, str] = {}  # device type -> backend name, decided once per process


def _op_set(name: str):
    """The ops of backend ``name``, importing (and so registering) them on first use."""
    if name not in _OP_SETS:
        if name == "triton":
            _OP_SETS[name] = import_triton_backend().OPS
        elif name == "cudnn":
            from . import cudnn

            _OP_SETS[name] = cudnn.OPS
        else:
            from . import aten

            _OP_SETS[name] = aten.OPS
    return _OP_SETS[name]


def register_flop_formulas() -> None:
    """Makes ``torch.utils.flop_counter.FlopCounterMode`` count the compiled ops of "aten" and "cudnn"
    (idempotent; see ``dfs_kernels.ops._flops``)."""
    ops._flops.register_flop_formulas()


# --- availability and resolution -------------------------------------------------------------------


def _compute_unavailable_reason(name: str, device_type: str) -> str | None:
    if name == "reference":
        return None
    if name == "triton":
        return triton_state(device_type)[0]
    if not _library.LOADED:
        return f"the compiled ops library is not loaded ({_library.load_error()})"
    if name == "aten" and not _library.has_kernels_for(device_type):
        return f"the compiled ops library has no {device_type} kernels" + (
            " (built without CUDA: rebuild where nvcc and a CUDA torch are present)" if device_type == "cuda" else ""
        )
    if name == "cudnn":
        if not _library.CUDNN_BACKEND_BUILT:
            return (
                "the compiled ops library was built without the 'cudnn' backend (it needs nvcc, a CUDA build of "
                "torch and cuDNN at build time; see CMakeLists.txt)"
            )
        if device_type != "cuda":
            return f"the 'cudnn' backend runs on CUDA tensors only, not {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


# (backend, device type) -> why it cannot run there, or None. Nothing it depends on changes within a
# process except the Triton interpreter's state, which triton_state keeps; computed for CPU and CUDA
# at import, so that torch.compile traces a dict lookup.
_REASONS: dict[tuple[str, str], str | None] = {}


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("unavailable_reason takes a backend name, not 'auto' (see resolve_backend)")
    device_type = torch.device(device).type
    if name == "triton":
        return triton_state(device_type)[0]
    key = (name, device_type)
    if key not in _REASONS:
        _REASONS[key] = _compute_unavailable_reason(name, device_type)
    return _REASONS[key]


def available_backends(device: torch.device | str = "cpu", *, include_interpreted: bool = False) -> list[str]:
    """Names of the backends that can run on ``device`` (default CPU), in ``"auto"``'s order of
    preference. The Triton backend under the interpreter is listed only with
    ``include_interpreted=True`` (it runs, slowly, but is never a real choice)."""
    device_type = torch.device(device).type
    return [
        name
        for name in _AUTO_PREFERENCE
        if unavailable_reason(name, device_type) is None
        and (include_interpreted or name != "triton" or not triton_interpreted(device_type))
    ]


def check_backend_name(backend: object) -> None:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


def _auto_candidates(device_type: str) -> list[str]:
    """The backends "auto" chooses among on ``device_type``: the available ones other than the
    oracle, or the oracle alone."""
    names = [name for name in available_backends(device_type) if name != "reference"]
    return names or ["reference"]


def _auto_choice(device_type: str) -> str:
    if device_type not in _AUTO_CHOICES:
        candidates = _auto_candidates(device_type)
        # On CPU "auto" is the ATen path; on CUDA several candidates are measured per call.
        measured = device_type in _MEASURED_AUTO and len(candidates) > 1
        choice = "auto" if measured else candidates[0]
        if not torch.compiler.is_compiling():
            logger.info(
                "backend='auto' chose %r for %s tensors%s", choice, device_type,
                f" (measured per call among {candidates})" if measured else "",
            )
        _AUTO_CHOICES[device_type] = choice
    return _AUTO_CHOICES[device_type]


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """The backend that a call with ``backend`` on ``device`` runs: ``"auto"`` resolved to a name, an
    explicit name checked. Raises ValueError for an unknown name and BackendUnavailableError (a
    ValueError) for a known backend that cannot run on ``device``; an explicit request never falls back.

    On CUDA with several candidate backends, ``"auto"`` resolves to ``"auto"``: the choice is made
    per call by measurement (see ``auto_choices()``).
    """
    check_backend_name(backend)
    device_type = torch.device(device).type
    if backend == "auto":
        return _auto_choice(device_type)
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is not available on {device_type}: {reason}")
    return backend


def implementation(backend: str, device: torch.device | str):
    """The ops that a call with ``backend`` on ``device`` runs (resolved once; see ``resolve_backend``)."""
    device_type = torch.device(device).type
    name = resolve_backend(backend, device_type)
    return _MEASURED_AUTO[device_type] if name == "auto" else _op_set(name)


auto.connect(implementation=lambda name, device_type: _op_set(name), candidates=_auto_candidates)

_REASONS.update({(name, device): _compute_unavailable_reason(name, device)
                 for name in ("reference", "aten", "cudnn") for device in ("cpu", "cuda")})
if _library.LOADED:
    # Registers the fakes and autograd formulas of the compiled ops as soon as the library is loaded,
    # so that torch.ops.dfs_kernels.* called directly (or traced) behave like the backend's calls.
    # The cudnn_ schemas exist in every build (their kernels only in CUDA builds with cuDNN): their
    # fakes let a CPU-only machine trace them.
    _op_set("aten")
    _op_set("cudnn")
