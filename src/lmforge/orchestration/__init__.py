"""Orchestration: running the pipeline and the service as processes, from `lmforge run`, the
Prefect flows and the tests.

* :mod:`.process_groups`: child process trees that stop the way Ctrl-C stops them;
* :mod:`.dvc_lock`: DVC's lock file, cleared of dead processes' entries;
* :mod:`.overrides`: parameter overrides written into params.yaml (as `dvc exp run -S` does);
* :mod:`.pipeline_run`: one MLflow parent run per pipeline run;
* :mod:`.run_form`: the typed form a person fills in to start a run (the Prefect UI renders it);
* :mod:`.run_summary`: a run's metrics beside the champion's, the gate decision, the links;
* :mod:`.bento_service`: start, wait for and stop `bentoml serve`.
"""
