"""realign: post-hoc safety realignment of fine-tuned LLMs (Safe LoRA, NLSR, SaLoRA)."""

__version__ = "0.1.0"


def safelora(*args, **kwargs):
    """Safe LoRA on a PEFT adapter; see realign.jobs.safelora.safelora for the arguments."""
    from .jobs.safelora import safelora as _run

    return _run(*args, **kwargs)


def safelora_full(*args, **kwargs):
    """Safe LoRA on a full fine-tuned checkpoint; see realign.jobs.safelora_full.safelora_full."""
    from .jobs.safelora_full import safelora_full as _run

    return _run(*args, **kwargs)


def audit(*args, **kwargs):
    """The weight-only safety-drift gate; see realign.jobs.audit.audit (verdict in report.summary)."""
    from .jobs.audit import audit as _run

    return _run(*args, **kwargs)


__all__ = ["__version__", "audit", "safelora", "safelora_full"]
