# Helpers shared by Loom's CMake files.

# Precompiled headers: one PCH built once (on loom_pch) and reused by every
# target, because each translation unit that parses libtorch costs ~15 s.
set(LOOM_PCH_HEADERS
  <ATen/ATen.h> <torch/types.h> <torch/autograd.h> <mpi.h>
  <string> <vector> <memory> <functional> <unordered_map>)

function(loom_use_pch target)
  if(NOT LOOM_USE_PCH)
    return()
  endif()
  if(NOT TARGET loom_pch)
    add_library(loom_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch.cc)
    target_link_libraries(loom_pch PUBLIC torch MPI::MPI_CXX)
    target_precompile_headers(loom_pch PRIVATE ${LOOM_PCH_HEADERS})
  endif()
  target_precompile_headers(${target} REUSE_FROM loom_pch)
endfunction()

# Test binaries: their code sets up and compares (the work runs in libloom,
# built with the release flags), so optimised builds compile them at -O1 with a precompiled
# header of their own that adds GoogleTest and torch::nn: half the compile time
# of a test file at -O3 with the library's header (CI builds ~30 of them).
set(LOOM_TEST_PCH_HEADERS ${LOOM_PCH_HEADERS}
  <gtest/gtest.h> <torch/nn/module.h> <torch/nn/pimpl.h> <torch/nn/modules/container/modulelist.h>
  <torch/nn/modules/linear.h> <torch/nn/modules/embedding.h>)

set(LOOM_TEST_OPTIMIZATION $<$<CONFIG:Release,RelWithDebInfo,MinSizeRel>:-O1>)

function(loom_use_test_pch target)
  target_compile_options(${target} PRIVATE ${LOOM_TEST_OPTIMIZATION})
  if(NOT LOOM_USE_PCH)
    return()
  endif()
  if(NOT TARGET loom_test_pch)
    add_library(loom_test_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch.cc)
    target_link_libraries(loom_test_pch PUBLIC torch MPI::MPI_CXX GTest::gtest)
    target_compile_options(loom_test_pch PRIVATE ${LOOM_TEST_OPTIMIZATION})
    target_precompile_headers(loom_test_pch PRIVATE ${LOOM_TEST_PCH_HEADERS})
  endif()
  target_precompile_headers(${target} REUSE_FROM loom_test_pch)
endfunction()

# loom_add_mpi_test(NAME <name> TARGET <exe> [FILTER <gtest filter>]
#                   [RANKS 1 2 3 4] [LABELS ...] [TIMEOUT s] [ARGS ...]
#                   [MPIRUN_FLAGS ...])
# Registers <name>.np<k> for each rank count k: the executable under mpirun
# with --oversubscribe and one intra-op thread per rank. A failure on any rank
# fails the test (the test main gathers failures; mpirun exits non-zero).
function(loom_add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TARGET;FILTER;TIMEOUT" "RANKS;LABELS;ARGS;MPIRUN_FLAGS" ${ARGN})
  if(NOT T_RANKS)
    set(T_RANKS 1 2 3 4)
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  if(NOT T_FILTER)
    set(T_FILTER "*")
  endif()
  foreach(np IN LISTS T_RANKS)
    set(test_name ${T_NAME}.np${np})
    # Suites named *Kernel test one rank's kernel (no world communicator):
    # at more ranks every rank would repeat the same work, so they run at np1 only.
    set(filter_args "--gtest_filter=${T_FILTER}")
    if(np GREATER 1)
      if(T_FILTER MATCHES "-")
        set(filter_args "--gtest_filter=${T_FILTER}:*Kernel.*")
      else()
        set(filter_args "--gtest_filter=${T_FILTER}-*Kernel.*")
      endif()
    endif()
    add_test(NAME ${test_name}
      COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} --oversubscribe ${T_MPIRUN_FLAGS}
              ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${T_TARGET}> ${filter_args} ${T_ARGS} ${MPIEXEC_POSTFLAGS})
    set_tests_properties(${test_name} PROPERTIES
      LABELS "mpi;np${np};${T_LABELS}"
      TIMEOUT ${T_TIMEOUT}
      PROCESSORS ${np}
      ENVIRONMENT "${LOOM_TEST_ENVIRONMENT}")
  endforeach()
endfunction()

# Environment for every test run under mpirun: allowed as root (CI runs as
# root), one thread per rank, shared-memory transport that works in containers.
set(LOOM_TEST_ENVIRONMENT
  "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;LOOM_COMM_TIMEOUT_S=120;OMP_NUM_THREADS=1;LOOM_THREADS_PER_RANK=1;OMPI_MCA_btl_vader_single_copy_mechanism=none;OMPI_MCA_rmaps_base_oversubscribe=1"
  CACHE INTERNAL "")

# OpenMPI flags that make ranks on one machine talk as if on different nodes:
# TCP between processes (no shared-memory transport), over the loopback
# interface only (tests send nothing to other addresses). docker/README.md
# names the same settings for a real multi-node run.
set(LOOM_CROSS_NODE_MPIRUN_FLAGS --mca btl tcp,self --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo
  CACHE INTERNAL "")
