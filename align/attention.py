"""The attention backend of a model, one config field (``model.attention_backend``) through
diffusers' attention dispatch (``ModelMixin.set_attention_backend``): ``native`` (torch SDPA, the
default), ``flash``, ``sage``, ``xformers``, ``flex`` and the rest of diffusers' backend names,
where their package is installed. A name diffusers does not know, or one whose package is missing,
is a one-line ConfigError before any model loads; ``align env`` lists what this machine can use."""

from __future__ import annotations

from align.errors import ConfigError, unknown_name_error

#: the backends ``align env`` reports (diffusers knows more; any of its names may be configured)
MAIN_BACKENDS = ("native", "flash", "_flash_3", "sage", "xformers", "flex", "_native_flash", "_native_efficient",
                 "_native_cudnn", "_native_math")


def backend_names() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def backend_problem(name: str) -> str | None:
    """Why the backend cannot run here (its package is missing), or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as err:
        return str(err).splitlines()[0]
    return None


def check_attention_backend(name: str, field: str = "model.attention_backend") -> None:
    if name not in backend_names():
        raise unknown_name_error("attention backend", name, backend_names(), field=field)
    problem = backend_problem(name)
    if problem is not None:
        raise ConfigError(f"{field}: {name!r} cannot run here: {problem}")


def apply_attention_backend(adapter, name: str) -> None:
    """Route the denoiser's attention through ``name``; ``native`` leaves it as loaded."""
    if name == "native":
        return
    denoiser = adapter.base_denoiser
    if hasattr(adapter, "route_attention_through_dispatch"):  # stock processors that call SDPA directly
        adapter.route_attention_through_dispatch()
    if not hasattr(denoiser, "set_attention_backend"):
        raise ConfigError(f"model.attention_backend: the {adapter.name!r} denoiser ({type(denoiser).__name__}) does "
                          f"not use diffusers' attention dispatch; leave it 'native'")
    denoiser.set_attention_backend(name)
    processors = [m.processor for m in denoiser.modules() if getattr(m, "processor", None) is not None]
    if not any(getattr(p, "_attention_backend", None) == name for p in processors):
        kinds = sorted({type(p).__name__ for p in processors}) or ["none"]
        raise ConfigError(f"model.attention_backend: the {adapter.name!r} denoiser's attention processors "
                          f"({', '.join(kinds)}) do not go through diffusers' dispatch; leave it 'native'")


def available_backends() -> dict[str, str]:
    """backend -> "yes" or why not, for ``align env``."""
    return {name: "yes" if (problem := backend_problem(name)) is None else f"no ({problem[:90]})"
            for name in MAIN_BACKENDS}
