"""Settings checks that need the synth layer's knowledge: patterns and modality templates."""

from __future__ import annotations

from collections.abc import Iterator

from fabricatord.config import Settings
from fabricatord.synth.encoding import TRANSFER_SYNTAXES
from fabricatord.synth.patterns import Pattern, PatternError
from fabricatord.synth.templates import TEMPLATES

# PS3.5 6.2: AccessionNumber is SH (16 characters), PatientID is LO (64 characters).
PATTERN_LIMITS = {
    "patient_id_pattern": ("PatientID (LO)", 64),
    "accession_pattern": ("AccessionNumber (SH)", 16),
}


def settings_problems(settings: Settings) -> Iterator[tuple[str, str]]:
    for key, (attribute, limit) in PATTERN_LIMITS.items():
        text = getattr(settings.synth, key)
        try:
            pattern = Pattern.parse(text)
        except PatternError as exc:
            yield f"synth.{key}", f"{exc}"
            continue
        if pattern.max_length > limit:
            yield (
                f"synth.{key}",
                f"{text!r} makes values of up to {pattern.max_length} characters; {attribute} holds {limit}",
            )
    for code, template in settings.synth.procedure_templates.items():
        if template.upper() not in TEMPLATES:
            yield f"synth.procedure_templates.{code}", f"no template {template!r} (known: {', '.join(TEMPLATES)})"
    for code, override in settings.synth.modality.items():
        if code not in TEMPLATES:
            yield (
                f"synth.modality.{code}",
                f"no template for {code} (known: {', '.join(TEMPLATES)})",
            )
        if override.transfer_syntax and override.transfer_syntax not in TRANSFER_SYNTAXES:
            yield (
                f"synth.modality.{code}.transfer_syntax",
                f"expected one of {', '.join(TRANSFER_SYNTAXES)}",
            )
        if override.acquisition and override.acquisition not in (
            "immediate",
            "delay",
            "on_query",
            "manual",
        ):
            yield (
                f"synth.modality.{code}.acquisition",
                "expected immediate, delay, on_query or manual",
            )
