"""Typed errors of the prompt store.

DESIGN.md ("The task artifact"): every validation failure becomes a 4xx whose message names the field.
`ArtifactError.field` carries that name so the HTTP layer can map it in one place without parsing text.
"""

from __future__ import annotations


class ArtifactError(ValueError):
    """A task artifact (or its header) is malformed, hostile, over a limit, or unfit for a backbone.

    `field` names what is wrong: a tensor name (`prompts`, `head.weight`, `head.bias`, or an unknown
    tensor's name), a metadata key (`format`, `mode`, `labels`, ...), or one of the structural pseudo
    fields `file` (size, truncation, trailing bytes), `header` (the safetensors JSON header) and
    `__metadata__` (the header's metadata table). docs/artifact-format.md lists which rule uses which.
    """

    field: str  # the offending tensor / metadata key / pseudo field
    message: str  # human-readable reason, without the field prefix

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple[type[ArtifactError], tuple[str, str]]:
        # The default reduce would call ArtifactError(str(self)) and fail; errors cross process
        # boundaries (decode pools, multiprocessing), so keep them picklable.
        return (type(self), (self.field, self.message))
