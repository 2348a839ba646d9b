// loom-train: Loom's main executable, launched with mpirun.
//
//   mpirun -np 4 loom-train --config configs/demo.pbtxt [--set section.field=value ...]
//
// Exit codes: 0 success, 2 bad command line or config (the message names the
// field), 3 the requested action is not supported by this build, 1 any other
// error. Every rank returns the same code: errors found on one rank are agreed
// on before any collective.
#include <CLI/CLI.hpp>

#include <iostream>

#include "runtime/error.h"
#include "runtime/job.h"
#include "runtime/logging.h"
#include "runtime/mpi_communicator.h"

namespace {

struct Options {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
  bool dry_run = false;
};

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int run(int argc, char** argv) {
  const bool is_root = world_rank() == 0;
  CLI::App app{"loom-train: train long-context language models with sequence parallelism (mpirun -np N loom-train ...)",
               "loom-train"};
  Options opt;
  app.set_version_flag("--version", std::string("loom-train ") + LOOM_VERSION_STRING);
  app.add_option("--config", opt.config_path, "Config file in protobuf text format (.pbtxt)");
  app.add_option("--set", opt.overrides, "Override a config field: --set section.field=value (repeatable)");
  app.add_flag("--print-config", opt.print_config, "Print the resolved config (rank 0) and exit");
  app.add_flag("--dry-run", opt.dry_run, "Set up MPI, threads and the process mesh, report them, and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version arrive here too, with exit code 0.
    std::ostringstream out, err;
    const int code = app.exit(e, out, err);
    if (is_root) {
      std::cout << out.str();
      std::cerr << err.str();
    }
    return code == 0 ? 0 : 2;
  }

  loom::pb::LoomConfig config;
  try {
    config = loom::resolve_config_on_all_ranks(opt.config_path, opt.overrides);
  } catch (const loom::ConfigError& e) {
    if (is_root) std::cerr << "loom-train: " << e.what() << std::endl;
    return 2;
  }
  if (opt.print_config) {
    if (is_root) std::cout << loom::config_to_text(config) << std::flush;
    return 0;
  }

  std::unique_ptr<loom::Job> job;
  try {
    job = std::make_unique<loom::Job>(config);
  } catch (const loom::ConfigError& e) {
    if (is_root) std::cerr << "loom-train: " << e.what() << std::endl;
    return 2;
  }
  LOOM_LOG(kInfo) << "loom-train " << LOOM_VERSION_STRING << ": " << job->world()->size() << " ranks, "
                  << job->mesh().describe() << ", " << job->threads_per_rank() << " threads per rank";
  if (opt.dry_run) {
    job->world()->barrier()->wait();
    LOOM_LOG(kInfo) << "dry run complete";
    return 0;
  }
  if (is_root)
    std::cerr << "loom-train: training is not supported by this build yet: only --print-config and --dry-run are "
                 "available"
              << std::endl;
  return 3;
}

}  // namespace

int main(int argc, char** argv) {
  int code = 1;
  try {
    loom::MpiEnvironment mpi(&argc, &argv);
    try {
      code = run(argc, argv);
    } catch (const std::exception& e) {
      std::cerr << "loom-train: error on rank " << world_rank() << ": " << e.what() << std::endl;
      // Other ranks may be inside a collective waiting for this one.
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-train: " << e.what() << std::endl;
    return 1;
  }
  return code;
}
