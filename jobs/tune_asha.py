"""ASHA whose rungs survive a continued search.

Tune saves no scheduler state: a search continued from its folder (`jobs.tune.build_tuner`)
gets ASHA back as it was created, with empty rungs. Every trial would then pass the next
rung it reaches (an empty rung has no cutoff), and the search would spend on weak trials
what the rungs had been keeping from them. `ResumableASHA` refills them as Tune adds back
each trial of the search: the trial's validation results up to the last one Tune had
received (its restored last result) or, where newer, up to its run's newest checkpoint (which
it resumes from, never to report those steps again), read from its training run's
``metrics.csv`` (written beside every checkpoint) and, for a run that diverged, its last
report (the worst figures, never checkpointed: ``diverged.json`` says the step), go through
the rungs as they went when first reported. A result Tune never received goes into its rung
at once, for other trials to be judged against, but is judged itself at the trial's next
report, against that rung as every trial of the search has refilled it by then (judged as
its trial is added, it would meet only the trials added before it): the trial stops there
where the rung would have stopped it; a trial that had ended takes back only what Tune
received. A row after the newest checkpoint is
left to the trial's next report to be judged. A trial with neither (a new one) adds nothing,
and a run folder that cannot be read costs the rungs that trial's results, not the search.
Defined apart from `jobs.tune` so that the tune command's start-up does not import Ray Tune;
Tune's saved search names this module.
"""

from __future__ import annotations

import json
import logging
import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from jobs import storage
from jobs.storage import S3Options
from jobs.train import DIVERGED_FILE, read_metrics

log = logging.getLogger(__name__)


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` (with ``time_attr="step"``) for trials whose training runs are
    folders of `trials_url` named by trial id."""

    def __init__(self, *, trials_url: str, s3: S3Options | None = None, **asha) -> None:
        if asha.get("brackets", 1) != 1:  # a restored trial could land in another bracket
            raise ValueError("ResumableASHA keeps one bracket")
        super().__init__(time_attr="step", **asha)
        self.trials_url, self.s3 = trials_url, s3
        # trial id -> (rung's milestone, value) of the results Tune never received
        self._unjudged: dict[str, list[tuple[float, float]]] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        received = (trial.last_result or {}).get(self._time_attr, -1)
        # The trial resumes from its run's newest checkpoint, which may be newer than its
        # last result Tune saved: it never reports the steps up to it again. A trial that
        # ended (stopped by a rung, say) resumes not at all: a checkpoint its workers wrote
        # as they were stopped holds results the rungs never had.
        resumed = received
        if trial.status != Trial.TERMINATED:
            resumed = max(received, self.checkpointed(trial.trial_id))
        if resumed < 0:
            return
        results = [(s, v) for s, v in self.recorded_results(trial.trial_id) if s <= resumed]
        bracket = self._trial_info[trial.trial_id]
        for step, value in results:
            before = self._rungs_of(bracket, trial.trial_id)
            bracket.on_result(trial, step, self._metric_op * value)  # decisions made stand
            if step > received:  # one never made: at the trial's next report
                for milestone in self._rungs_of(bracket, trial.trial_id) - before:
                    entry = (milestone, self._metric_op * value)
                    self._unjudged.setdefault(trial.trial_id, []).append(entry)
        if results:
            print(f"tune: ASHA's rungs take back trial {trial.trial_id}'s {len(results)} "
                  f"result(s) up to step {results[-1][0]}")  # fmt: skip

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        bracket = self._trial_info.get(trial.trial_id)
        for milestone, value in self._unjudged.pop(trial.trial_id, []):
            recorded = dict(bracket._rungs)[milestone]
            cutoff = bracket.cutoff({k: v for k, v in recorded.items() if k != trial.trial_id})
            if cutoff is not None and value < cutoff:
                return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)

    @staticmethod
    def _rungs_of(bracket, trial_id: str) -> set[float]:
        """The milestones of the bracket's rungs that hold a result of the trial."""
        return {milestone for milestone, recorded in bracket._rungs if trial_id in recorded}

    def checkpointed(self, trial_id: str) -> int:
        """The step of the trial's run's newest checkpoint (-1 for none, or for a run that
        cannot be listed)."""
        from jobs.models import checkpoint_files, checkpoint_step

        try:
            files = checkpoint_files(storage.join(self.trials_url, trial_id), self.s3)
        except Exception as e:  # unreadable: judged on what Tune received
            log.warning("tune: trial %s's checkpoints cannot be listed: %s: %s",
                        trial_id, type(e).__name__, e)  # fmt: skip
            return -1
        return checkpoint_step(files[-1]) if files else -1

    def recorded_results(self, trial_id: str) -> list[tuple[int, float]]:
        """(step, metric) of each validation the trial's run recorded, in step order, and of
        the worst figures it reported if it diverged."""
        from jobs.validation import ValidationResult

        run = storage.join(self.trials_url, trial_id)
        diverged = storage.join(run, DIVERGED_FILE)
        try:
            rows = read_metrics(run, self.s3)
            if storage.exists(diverged, self.s3):
                step = json.loads(storage.read_bytes(diverged, self.s3))["step"]
                rows.append({"step": step} | ValidationResult.worst().as_metrics())
        except Exception as e:  # unreadable: the rungs go without this trial's results
            log.warning("tune: ASHA's rungs lack trial %s's earlier results: %s: %s",
                        trial_id, type(e).__name__, e)  # fmt: skip
            return []
        found = [(int(r["step"]), r[self._metric]) for r in rows if self._metric in r]
        return sorted((step, value) for step, value in found if not math.isnan(value))
