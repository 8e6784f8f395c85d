"""Backend registry: which implementations of the DFS ops exist, which are available for a device,
and what ``backend="auto"`` picks.

A backend is a namespace with five functions taking validated arguments:
``partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels)``,
``partitioned_conv2d_with_exit_pool(...)`` (the same arguments), ``reroute(x, shared_channels)``,
``exit_reference(x, shared_channels)`` and ``exit_avg_pool(x, shared_channels)``.

Backends:
- ``"reference"``: the literal eager oracle (``dfs_kernels.reference``), always available.
- ``"aten"``: oneDNN / cuDNN convolutions with the DFS glue of the compiled library (csrc/).
- ``"triton"``: Triton kernels (``dfs_kernels.backends.triton``) on CUDA; on CPU only under the
  Triton interpreter (``TRITON_INTERPRET=1`` before the backend is first used), which is for tests
  and debugging: it is available on explicit request but never listed by ``available_backends``
  (unless ``include_interpreted=True``) nor chosen by ``"auto"``. Triton is imported only once the
  backend is asked for on a device where it can run.
- ``"cuda"``: the compiled library's CUDA ops (``dfs_kernels.backends.cuda``): cuDNN writes the shared
  channels' input gradient in place into the full-size gradient. CUDA tensors only, and only where the
  library was built with CUDA and cuDNN.

``"auto"``: on CPU, the first available of ("aten", "reference"). On CUDA, with a single candidate
that one; with several (aten, cuda, triton) ``resolve_backend`` returns ``"auto"``, whose
implementation (``dfs_kernels.backends.auto``) measures per call key which is fastest.
"""

from __future__ import annotations

import logging
import types

import torch

from .. import _library, reference
from . import _flops, auto
from ._errors import BackendUnavailableError
from ._triton_availability import import_triton_backend, triton_interpreted, triton_state
from .auto import AUTO_MARGIN, MeasuredAuto, auto_choices

logger = logging.getLogger("dfs_kernels")

BACKENDS = ("reference", "aten", "triton", "cuda")
"""Every backend name the package knows, available or not."""

_AUTO_PREFERENCE = ("aten", "cuda", "triton", "reference")


def _reference_backend() -> types.SimpleNamespace:
    def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return reference.partitioned_conv2d(
            input, weight, bias, stride, padding, dilation, groups, shared_channels=shared_channels
        )

    def partitioned_conv2d_with_exit_pool(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return reference.partitioned_conv2d_with_exit_pool(
            input, weight, bias, stride, padding, dilation, groups, shared_channels=shared_channels
        )

    return types.SimpleNamespace(
        partitioned_conv2d=partitioned_conv2d,
        partitioned_conv2d_with_exit_pool=partitioned_conv2d_with_exit_pool,
        reroute=reference.reroute,
        exit_reference=reference.exit_reference,
        exit_avg_pool=reference.exit_avg_pool,
    )


_IMPLEMENTATIONS: dict[str, object] = {}
_AUTO_CHOICES: dict[str, str] = {}  # device type -> backend name, decided once per process


def _implementation(name: str, device_type: str = "cpu"):
    if name == "auto":  # the measured choice among several candidates (CUDA): one per device type
        key = f"auto:{device_type}"
        if key not in _IMPLEMENTATIONS:
            _IMPLEMENTATIONS[key] = MeasuredAuto(device_type=device_type)
        return _IMPLEMENTATIONS[key]
    if name not in _IMPLEMENTATIONS:
        if name == "reference":
            _IMPLEMENTATIONS[name] = _reference_backend()
        elif name == "aten":
            from . import aten

            _IMPLEMENTATIONS[name] = aten
        elif name == "triton":
            _IMPLEMENTATIONS[name] = import_triton_backend()
        elif name == "cuda":
            from . import cuda

            _IMPLEMENTATIONS[name] = cuda
        else:
            raise AssertionError(name)
    return _IMPLEMENTATIONS[name]


def register_flop_formulas() -> None:
    """Makes ``torch.utils.flop_counter.FlopCounterMode`` count the compiled ops of "aten" and "cuda"
    (idempotent; see ``dfs_kernels.backends._flops``)."""
    if _library.LOADED:
        _implementation("aten")
        if _library.CUDA_BACKEND_BUILT:
            _implementation("cuda")
    _flops.register_flop_formulas()


# --- availability and resolution -------------------------------------------------------------------


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    check_backend_name(name)
    device_type = torch.device(device).type
    if name == "reference":
        return None
    if name == "aten":
        if not _library.LOADED:
            return f"the compiled ops library is not loaded ({_library.load_error()})"
        if not _library.has_kernels_for(device_type):
            return (
                f"the compiled ops library has no {device_type} kernels"
                + (" (built without CUDA: rebuild where nvcc and a CUDA torch are present)" if device_type == "cuda" else "")
            )
        if device_type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if name == "triton":
        return triton_state(device_type)[0]
    if name == "cuda":
        return _cuda_unavailable_reason(device_type)
    raise AssertionError(name)


_CUDA_BACKEND_REASONS: dict[str, str | None] = {}  # device type -> why "cuda" cannot run there, or None


def _cuda_unavailable_reason(device_type: str) -> str | None:
    # Nothing it depends on changes within a process: computed once per device type (CPU and CUDA at
    # import, below), so that torch.compile traces a dict lookup.
    if device_type not in _CUDA_BACKEND_REASONS:
        _CUDA_BACKEND_REASONS[device_type] = _compute_cuda_unavailable_reason(device_type)
    return _CUDA_BACKEND_REASONS[device_type]


def _compute_cuda_unavailable_reason(device_type: str) -> str | None:
    if not _library.LOADED:
        return f"the compiled ops library is not loaded ({_library.load_error()})"
    if not _library.CUDA_BACKEND_BUILT:
        return (
            "the compiled ops library was built without the 'cuda' backend (it needs nvcc, a CUDA build of torch "
            "and cuDNN at build time; see CMakeLists.txt)"
        )
    if device_type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors only, not {device_type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


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
        # On CPU "auto" is the ATen path; elsewhere several candidates are measured per call.
        choice = candidates[0] if device_type == "cpu" or len(candidates) == 1 else "auto"
        if not torch.compiler.is_compiling():
            logger.info(
                "backend='auto' chose %r for %s tensors%s", choice, device_type,
                f" (measured per call among {candidates})" if choice == "auto" else "",
            )
        _AUTO_CHOICES[device_type] = choice
    return _AUTO_CHOICES[device_type]


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """The backend that a call with ``backend`` on ``device`` runs: ``"auto"`` resolved to a name, an
    explicit name checked. Raises ValueError for an unknown name and BackendUnavailableError (a
    ValueError) for a known backend that cannot run on ``device``; an explicit request never falls back.

    On CUDA with several candidate backends, ``"auto"`` resolves to ``"auto"``: the choice is made
    per call by measurement (see the module docstring and ``auto_choices()``).
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
    """The namespace of functions of the backend that ``backend`` resolves to on ``device``."""
    device_type = torch.device(device).type
    return _implementation(resolve_backend(backend, device_type), device_type)


auto.connect(implementation=_implementation, candidates=_auto_candidates)

# The namespaces are built at import: torch.compile traces looking them up, not building them.
_IMPLEMENTATIONS["reference"] = _reference_backend()
_IMPLEMENTATIONS["auto:cuda"] = MeasuredAuto(device_type="cuda")
_CUDA_BACKEND_REASONS.update({device: _compute_cuda_unavailable_reason(device) for device in ("cpu", "cuda")})
if _library.LOADED:
    # Registers the autograd formulas and fakes of the compiled ops as soon as the library is loaded,
    # so that torch.ops.dfs_kernels.* called directly (or traced) behave like the backend's calls.
    from . import aten, cuda  # noqa: E402

    _IMPLEMENTATIONS["aten"] = aten
    _IMPLEMENTATIONS["cuda"] = cuda
