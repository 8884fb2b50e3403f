"""The study's phases bound to its model, judge, hardware and sizes; records where each phase ran."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from persona.study.config import Hardware, JudgeSettings, Sizes


@dataclass
class StudyContext:
    model: str
    judge: JudgeSettings
    hardware: Hardware
    sizes: Sizes

    # ---- what every phase shares ----------------------------------------------------------------------

    def stamp(self) -> dict:
        """The settings a phase's results depend on (its cache key includes them)."""
        return {"dtype": self.hardware.dtype, "sizes": vars(self.sizes), "judge": vars(self.judge)}

    def device(self) -> str:
        from persona.core.hardware import resolve_device

        return str(resolve_device(self.hardware.accelerator))

    def lightning(self) -> dict:
        """The pipeline commands' hardware flags (their predict loops), from the study's."""
        from persona.commands.flags import Hardware

        hw = self.hardware
        return {
            "hardware": Hardware(
                dtype=hw.dtype, accelerator=hw.accelerator, devices=hw.devices, strategy=hw.strategy
            )
        }

    def lm_and_tokenizer(self):
        from persona.models import load_model_and_tokenizer

        return load_model_and_tokenizer(self.model, dtype=self.hardware.dtype, device=self.device())

    def matmul_rate(self) -> float:
        """GFLOP/s of a 1024^2 float32 matmul on the study's device, to read its times against."""
        import torch

        device = self.device()
        a = torch.randn(1024, 1024, device=device)
        for _ in range(2):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, repeats = time.perf_counter(), 10
        for _ in range(repeats):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return 2 * 1024**3 * repeats / (time.perf_counter() - start) / 1e9

    # ---- phases -----------------------------------------------------------------------------------------

    def hello(self, phase_dir: Path) -> dict:
        from persona.data.chat import user_turn
        from persona.steering import generate_steered

        lm, tokenizer = self.lm_and_tokenizer()
        question = [user_turn("What is the capital of France?")]
        answer = generate_steered(lm, tokenizer, question, max_new_tokens=16, temperature=0)[0]
        config = lm.config.get_text_config()
        return {
            "model": self.model,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "answer": answer.strip(),
            "device": self.device(),
        }

    def extract(self, phase_dir: Path, trait: str, source: Path) -> dict:
        from persona.study import phases

        return phases.extract_phase(
            phase_dir, model=self.model, trait=trait, source=source, **self.lightning()
        )

    def layers(self, phase_dir: Path, vector_path: str, inputs: dict) -> dict:
        """Layer metrics on ``inputs``: pairs (``pairs_path``, ``split``) or judged CSVs (``pos_path``, ...)."""
        from persona.study import phases

        return phases.layers_phase(
            phase_dir, model=self.model, vector_path=vector_path, **inputs, **self.lightning()
        )

    def sweep(self, phase_dir: Path, trait: str, vector_path: str, source: Path, layer: int, split) -> dict:
        from persona.study import phases

        lm, tokenizer = self.lm_and_tokenizer()
        return phases.sweep_phase(
            phase_dir, lm, tokenizer, trait=trait, vector_path=vector_path, source=source, layer=layer,
            coefs=self.sizes.coefs, batch_size=self.sizes.batch_size, split=split, doses=self.sizes.doses,
        )  # fmt: skip

    def calibrate(
        self,
        phase_dir: Path,
        trait: str,
        vector_path: str,
        pairs: Path,
        split,
        metrics_csv: str,
        artifact=None,
    ) -> dict:
        """Judge-scored when the study's judge can score (not the embedded 135M one) and the trait has an eval
        prompt (an artifact); judge-free proxies otherwise."""
        from persona.judges import DEFAULT_LOCAL_MODEL
        from persona.study import phases

        embedded = self.judge.model in ("local", f"local:{DEFAULT_LOCAL_MODEL}")
        judge = None if embedded or artifact is None else {
            "spec": self.judge.model, "base_url": self.judge.base_url, "min_mass": self.judge.min_mass,
        }  # fmt: skip
        lm, tokenizer = self.lm_and_tokenizer()
        return phases.calibrate_phase(
            phase_dir, lm, tokenizer, model=self.model, trait=artifact if judge else trait, vector_path=vector_path,
            pairs=pairs, split=split, metrics_csv=metrics_csv, sizes=self.sizes, dtype=self.hardware.dtype,
            judge=judge,
        )  # fmt: skip

    def judged_sweep(self, phase_dir: Path, artifact: str, vector_path: str, layer: int, doses=None) -> dict:
        from persona.study import phases

        return phases.judged_sweep_phase(
            phase_dir, model=self.model, trait=artifact, vector_path=vector_path, layer=layer, sizes=self.sizes,
            judge=self.judge, doses=doses, **self.lightning(),
        )  # fmt: skip

    def generated(self, phase_dir: Path, trait: str, artifact: str) -> dict:
        from persona.study import phases

        return phases.generated_phase(
            phase_dir, model=self.model, trait=trait, artifact=artifact, sizes=self.sizes, judge=self.judge,
            **self.lightning(),
        )  # fmt: skip

    def generations(
        self, phase_dir: Path, vector_path: str, layer: int, recommended: dict | None = None
    ) -> dict:
        """Steered answers at -s, 0, +s: s the calibrated recommendation when there is one (its layer too), else
        the grid's largest coefficient (or dose)."""
        from persona.study import phases
        from persona.vectors import load_vector
        from persona.vectors.dose import coef_to_dose, dose_to_coef, layer_norms

        lm, tokenizer = self.lm_and_tokenizer()
        if recommended is not None:
            layer, coef, dose, source = (
                recommended["layer"],
                abs(recommended["coef"]),
                abs(recommended["dose"]),
                "calibration",
            )
        else:
            norm = layer_norms(vector_path, model=None, lm=lm, tokenizer=tokenizer)[layer]
            row = load_vector(vector_path)[layer]
            if self.sizes.doses:
                dose, source = max(self.sizes.doses), "sizes.doses"
                coef = dose_to_coef(dose, row, norm)
            else:
                coef, source = max(self.sizes.coefs), "sizes.coefs"
                dose = coef_to_dose(coef, row, norm)
        return phases.generations_phase(
            phase_dir, lm, tokenizer, vector_path=vector_path, layer=layer, coef=coef, dose=dose, source=source,
            max_new_tokens=self.sizes.max_new_tokens,
        )  # fmt: skip

    def finetune(
        self, phase_dir: Path, plan, vector_path: str, layer: int, base_metrics_csv: str | None
    ) -> dict:
        from persona.study.finetune import finetune_study

        return finetune_study(
            phase_dir, model=self.model, trait=plan.key, pairs_path=plan.pairs, artifact=plan.artifact,
            vector_path=vector_path, layer=layer, sizes=self.sizes, hardware=self.hardware,
            base_metrics_csv=base_metrics_csv,
        )  # fmt: skip

    def personality_arm(self, phase_dir: Path, trait: str) -> dict:
        from persona.study.personality_arm import personality_arm_phase

        return personality_arm_phase(
            phase_dir, model=self.model, trait=trait, sizes=self.sizes, hardware=self.hardware
        )

    def export(self, phase_dir: Path, trait: str, vector_path: str, layer: int) -> dict:
        from persona.study import phases

        return phases.export_phase(phase_dir, trait=trait, vector_path=vector_path, layer=layer)
