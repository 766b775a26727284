"""A tenant's LoRA registry in the object store: upload (checked), list, delete, and the
name -> content digest resolution a submission makes. Never imports torch: the shapes an
upload must match are those a GPU worker published for the served model."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from core.addons import (
    TENANTS_PREFIX,
    LoraRef,
    blob_key,
    check_lora_file,
    check_name,
    lora_key,
    lora_prefix,
    parse_lora_key,
    targets_key,
)
from core.errors import AddonNotFound, InvalidRequest, ModelNotReady, ObjectMissing
from core.objectstore import ObjectStore


class LoraRegistry:
    def __init__(self, objects: ObjectStore, tenant: str, model: str, max_bytes: int,
                 max_rank: int) -> None:
        self.objects, self.tenant, self.model = objects, tenant, model
        self.max_bytes, self.max_rank = max_bytes, max_rank

    def targets(self) -> dict[str, tuple[int, int]]:
        try:
            published = json.loads(self.objects.get(targets_key(self.model)))
        except ObjectMissing:
            raise ModelNotReady(f"no GPU worker serving {self.model!r} has published the "
                                "layers a LoRA may adapt yet; start one and retry") from None
        return {name: (shape[0], shape[1]) for name, shape in published.items()}

    def _entries(self, prefix: str) -> list[tuple[float, str, str, str]]:
        """(uploaded at, tenant, name, digest) under ``prefix``, oldest first."""
        found = []
        for key, modified in self.objects.modified_times(prefix).items():
            if parsed := parse_lora_key(key):
                found.append((modified, *parsed))
        return sorted(found)

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Check the file against the served model, store it, and make ``name`` point at
        it (a name uploaded again points at the new file; the old one is removed)."""
        check_name(name)
        checked = check_lora_file(data, self.targets(), self.max_bytes, self.max_rank)
        digest = hashlib.sha256(data).hexdigest()
        entry = {"name": name, "digest": digest, "rank": checked.rank,
                 "modules": len(checked.modules), "bytes": checked.size,
                 "uploaded_at": time.time(), "model": self.model}
        self.objects.put(blob_key(digest), data)
        self.objects.put(lora_key(self.tenant, name, digest), json.dumps(entry).encode(),
                         content_type="application/json")
        self._remove(name, keep=digest)
        return entry

    def list(self) -> list[dict[str, Any]]:
        newest = {name: digest for _, _, name, digest in self._entries(lora_prefix(self.tenant))}
        return [json.loads(self.objects.get(lora_key(self.tenant, name, digest)))
                for name, digest in sorted(newest.items())]

    def delete(self, name: str) -> None:
        check_name(name)
        if not self._remove(name, keep=None):
            raise AddonNotFound(name)

    def _remove(self, name: str, keep: str | None) -> bool:
        """Drop ``name``'s entries but ``keep``, and their files once no entry of any
        tenant names them. Whether there was one to drop."""
        dropped = [digest for _, _, _, digest in self._entries(f"{lora_prefix(self.tenant)}"
                                                                f"{name}/") if digest != keep]
        for digest in dropped:
            self.objects.delete(lora_key(self.tenant, name, digest))
        if dropped:
            still_named = {digest for *_, digest in self._entries(TENANTS_PREFIX)}
            for digest in set(dropped) - still_named:
                self.objects.delete(blob_key(digest))
        return bool(dropped)

    def resolve(self, loras: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
        """The request's adapters with the digests their names hold now (each checked on
        upload against the model served now: a new model needs its LoRAs uploaded again)."""
        resolved = []
        for index, ref in enumerate(loras):
            field = f"loras[{index}].name"
            entries = self._entries(f"{lora_prefix(self.tenant)}{ref.name}/")
            if not entries:
                raise InvalidRequest(field, f"{ref.name!r} is not an uploaded LoRA of this "
                                            "tenant")
            digest = entries[-1][3]
            checked_for = json.loads(self.objects.get(lora_key(self.tenant, ref.name, digest)))
            if checked_for.get("model") != self.model:
                raise InvalidRequest(field, f"{ref.name!r} was uploaded for model "
                                            f"{checked_for.get('model')!r}, not the one served "
                                            f"now ({self.model!r}): upload it again")
            resolved.append(LoraRef(ref.name, ref.scale, digest))
        return tuple(resolved)
