"""realign: post-hoc safety realignment of fine-tuned LLMs (Safe LoRA, NLSR, SaLoRA)."""

__version__ = "0.1.0"


def safelora(*args, **kwargs):
    """Safe LoRA on a PEFT adapter; see realign.jobs.safelora.safelora for the arguments."""
    from .jobs.safelora import safelora as _run

    return _run(*args, **kwargs)


__all__ = ["__version__", "safelora"]
