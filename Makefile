# stochca: make, make test, make run, make bench, make experiments, make clean.
# make OMP=0 builds without OpenMP; make NATIVE=0 without -march=native.

CC ?= cc
OMP ?= 1
NATIVE ?= 1
WARNINGS = -Wall -Wextra
# -O3 keeps IEEE semantics; never -Ofast, which changes the math (erf, NaN checks).
OPT = -O3

ifeq ($(NATIVE),1)
  OPT += $(shell $(CC) -march=native -x c -c /dev/null -o /dev/null 2>/dev/null && echo -march=native)
endif
ifeq ($(OMP),1)
  OMP_FLAGS := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
endif

CFLAGS_ALL = $(OPT) $(WARNINGS) $(OMP_FLAGS) $(CFLAGS)
SANITIZE = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

.PHONY: all test run bench experiments sanitize clean

all: train

train: train.c stochca.h
	@echo "building with: $(CC) $(CFLAGS_ALL)"
	$(CC) $(CFLAGS_ALL) -o $@ train.c -lm

# The gradient checks use a double-precision build of the header at -O2.
test_stochca: test.c train.c stochca.h
	$(CC) -O2 $(WARNINGS) -Wno-unused-function $(OMP_FLAGS) $(CFLAGS) -o $@ test.c -lm

test: test_stochca train
	./test_stochca

sanitize: test.c train.c stochca.h train
	$(CC) $(SANITIZE) $(WARNINGS) -Wno-unused-function $(CFLAGS) -o test_sanitize test.c -lm
	./test_sanitize

run: train
	./train

bench: train
	./train bench

# The transfer-learning and domain-generalization sweeps at full size, into
# $(OUT). Not part of CI. dg-sweep uses the p that tl-sweep chose by
# validation accuracy. Extra flags for both: make experiments SWEEP_FLAGS="--threads 2".
OUT ?= out
SWEEP_FLAGS ?=
experiments: train
	./train tl-sweep --out-dir $(OUT) $(SWEEP_FLAGS)
	./train dg-sweep --out-dir $(OUT) --p "$$(cat $(OUT)/tl-chosen-p.txt)" $(SWEEP_FLAGS)

clean:
	rm -f train test_stochca test_sanitize *.tmp
