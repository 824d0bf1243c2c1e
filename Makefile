# Thin targets: each calls one Python entry point (the same runs work under torchrun).
VENV    ?= .venv
PY      := $(VENV)/bin/python
CONFIG  ?= configs/cpu.yaml
AUGMENT_CONFIG ?= configs/augment.yaml
STUDENT_CONFIG ?= configs/student.yaml
COMPARE_CONFIG ?= configs/compare.yaml
ARGS    ?=
STUDENT ?=
LOSS    ?=
CACHE   ?=
student_overrides = $(if $(STUDENT),students=$(STUDENT)) $(if $(LOSS),losses=$(LOSS)) $(if $(CACHE),cache=$(CACHE))

.PHONY: install assets data teacher augment teacher-cache student compare demo test quality bench clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,export]'
	touch $@

assets: install            ## offline assets (models, GloVe, corpus) into .assets/
	$(PY) -m data.assets

data: assets
	$(PY) -m pipeline.train_teacher --config $(CONFIG) --data-only $(ARGS)

teacher: assets            ## fine-tune the teacher named in $(CONFIG)
	$(PY) -m pipeline.train_teacher --config $(CONFIG) $(ARGS)

augment: assets            ## augmented row sets (Tang rules, TinyBERT substitution)
	$(PY) -m augment.run --config $(AUGMENT_CONFIG) $(ARGS)

teacher-cache: assets      ## run the teacher once over splits + augmented sets (fine-tunes it if needed)
	$(PY) -m pipeline.teacher_cache --config $(CONFIG) $(ARGS)

student: install           ## train students from a cache: make student STUDENT=bilstm LOSS=hinton CACHE=...
	$(PY) -m trainer.train --config $(STUDENT_CONFIG) $(student_overrides) $(ARGS)

compare: assets            ## every distillation method on the default corpus -> reports/compare.md, .png
	$(PY) -m recipes.compare --config $(COMPARE_CONFIG) $(ARGS)

demo: assets               ## the whole job on the embedded default, on CPU, in minutes
	$(PY) -m pipeline.train_teacher --config $(CONFIG) --data-only
	$(PY) -m augment.run --config $(AUGMENT_CONFIG)
	$(PY) -m pipeline.teacher_cache --config $(CONFIG)
	$(PY) -m trainer.train --config configs/demo_students.yaml
	$(PY) -m trainer.latency work/students/demo/bilstm-hinton

test: assets               ## the test suite (tiny real models, tiny data)
	$(PY) -m pytest -q $(ARGS)

quality: assets             ## students vs references written outside the project -> bench/results/quality.md (hours on 2 cores)
	$(PY) bench/quality.py $(ARGS)

bench: assets               ## CPU benchmarks -> bench/results/ (bench/gpu.sh for the GPU ones); ~40 min on 2 cores
	$(PY) bench/teacher_cache.py
	$(PY) bench/loader.py
	$(PY) bench/student.py
	$(PY) bench/augment.py
	$(PY) bench/ranks.py
	$(PY) bench/faults.py trials=20 augment_trials=5

clean:
	rm -rf work
