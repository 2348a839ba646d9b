#include "loom/runtime/train/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <sstream>
#include <thread>

#include "loom/runtime/core/config.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/logging.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace fs = std::filesystem;
namespace {

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

at::ScalarType dtype_from_name(const std::string& name, const std::string& file) {
  if (auto t = scalar_type_from_name(name)) return *t;
  throw LoomError("checkpoint '" + file + "': unknown dtype '" + name + "'");
}
std::string dtype_name(at::ScalarType t) {
  if (auto name = scalar_type_name(t)) return *name;
  throw LoomError(std::string("checkpoint: cannot store dtype ") + c10::toString(t));
}

bool is_step_entry(const std::string& name) { return name.rfind("step-", 0) == 0; }
bool is_unfinished(const std::string& name) {
  return name.size() >= 4 && name.compare(name.size() - 4, 4, ".tmp") == 0;
}

std::string utc_stamp() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y%m%dT%H%M%SZ", &tm);
  return text;
}

// A new <dir>/superseded-<UTC time>[-n]/.
fs::path make_superseded_dir(const std::string& dir) {
  const std::string base = "superseded-" + utc_stamp();
  for (int n = 1;; ++n) {
    const fs::path candidate = fs::path(dir) / (n == 1 ? base : base + "-" + std::to_string(n));
    std::error_code ec;
    if (fs::create_directory(candidate, ec)) return candidate;
    if (ec) throw LoomError("checkpoint: cannot create '" + candidate.string() + "': " + ec.message());
  }
}

void move_into(const fs::path& from, const fs::path& into_dir) {
  std::error_code ec;
  fs::rename(from, into_dir / from.filename(), ec);
  if (ec)
    throw LoomError("checkpoint: cannot move '" + from.string() + "' into '" + into_dir.string() + "': " +
                    ec.message());
}

std::optional<pb::CheckpointManifest> read_manifest(const fs::path& dir) {
  std::ifstream in(dir / "manifest.pb", std::ios::binary);
  pb::CheckpointManifest manifest;
  if (!in || !manifest.ParseFromIstream(&in)) return std::nullopt;
  return manifest;
}

// Writes the checkpoint; an existing directory of the same name is removed
// when `replace_existing` (the caller wrote it) and moved aside otherwise.
std::string write_checkpoint(const std::string& dir, const CheckpointData& data, bool replace_existing) {
  const std::string name = checkpoint_name(data.manifest.step());
  const fs::path final_dir = fs::path(dir) / name, tmp_dir = fs::path(dir) / (name + ".tmp");
  std::error_code ec;
  fs::create_directories(dir, ec);
  fs::remove_all(tmp_dir, ec);  // an unfinished save of this step: never a checkpoint
  if (!fs::create_directories(tmp_dir, ec) && ec)
    throw LoomError("checkpoint: cannot create '" + tmp_dir.string() + "': " + ec.message());

  pb::CheckpointManifest manifest = data.manifest;
  if (!manifest.has_version()) manifest.set_version(1);
  manifest.set_state_file("state.bin");
  manifest.clear_tensors();
  const fs::path state_path = tmp_dir / "state.bin";
  // Fault injection, halfway through this step's state: die, or pause.
  const char* kill_env = std::getenv("LOOM_FAULT_KILL_DURING_SAVE");
  const bool kill_now = kill_env != nullptr && std::atoll(kill_env) == data.manifest.step();
  const char* pause_env = std::getenv("LOOM_FAULT_SLOW_SAVE_S");
  const double pause_s = pause_env != nullptr ? std::atof(pause_env) : 0.0;
  uint64_t total = 0;
  for (const auto& entry : data.tensors) total += entry.second.nbytes();
  bool fault_done = !(kill_now || pause_s > 0);
  uint64_t offset = 0, checksum = 1469598103934665603ull;
  {
    std::ofstream out(state_path, std::ios::binary | std::ios::trunc);
    if (!out) throw LoomError("checkpoint: cannot write '" + state_path.string() + "': " + std::strerror(errno));
    for (const auto& [tname, tensor] : data.tensors) {
      const at::Tensor t = tensor.detach().contiguous().cpu();
      auto* entry = manifest.add_tensors();
      entry->set_name(tname);
      entry->set_dtype(dtype_name(t.scalar_type()));
      for (auto s : t.sizes()) entry->add_shape(s);
      entry->set_offset(offset);
      entry->set_bytes(t.nbytes());
      const char* bytes = static_cast<const char*>(t.data_ptr());
      uint64_t written = 0;
      if (!fault_done && offset + t.nbytes() > total / 2) {
        written = total / 2 - std::min(total / 2, offset);
        out.write(bytes, static_cast<std::streamsize>(written));
        out.flush();
        if (kill_now) std::raise(SIGKILL);  // fault injection: die mid-save
        LOOM_LOG(kWarn) << "fault injection: pausing " << pause_s << " s halfway through saving step "
                        << data.manifest.step();
        std::this_thread::sleep_for(std::chrono::duration<double>(pause_s));
        fault_done = true;
      }
      out.write(bytes + written, static_cast<std::streamsize>(t.nbytes() - written));
      checksum = fnv1a64(bytes, t.nbytes(), checksum);
      offset += t.nbytes();
    }
    out.flush();
    if (!out)
      throw LoomError("checkpoint: writing '" + state_path.string() + "' failed: " + std::strerror(errno) +
                      " (disk full?)");
  }
  fsync_path(state_path.string());
  manifest.set_state_bytes(offset);
  manifest.set_state_checksum(checksum);
  {
    std::ofstream out(tmp_dir / "manifest.pb", std::ios::binary | std::ios::trunc);
    if (!manifest.SerializeToOstream(&out) || !out.flush())
      throw LoomError("checkpoint: writing the manifest in '" + tmp_dir.string() + "' failed");
  }
  fsync_path((tmp_dir / "manifest.pb").string());
  if (fs::exists(final_dir, ec)) {
    if (replace_existing) {
      fs::remove_all(final_dir, ec);
    } else {
      const fs::path aside = make_superseded_dir(dir);
      move_into(final_dir, aside);
      LOOM_LOG(kWarn) << "checkpoint: '" << final_dir.string() << "' was already there (not written by this run): "
                      << "moved it into '" << aside.string() << "'";
    }
  }
  fs::rename(tmp_dir, final_dir, ec);
  if (ec) throw LoomError("checkpoint: renaming '" + tmp_dir.string() + "' failed: " + ec.message());
  fsync_path(dir);
  return final_dir.string();
}

// Lock files: "key value" lines.
std::map<std::string, std::string> parse_lock(const std::string& text) {
  std::map<std::string, std::string> fields;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const auto space = line.find(' ');
    if (space != std::string::npos) fields[line.substr(0, space)] = line.substr(space + 1);
  }
  return fields;
}

std::optional<std::string> read_small_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, it
// names a process uniquely, so a reused pid is not taken for the lock holder.
std::string process_start_ticks(long pid) {
  const auto stat = read_small_file("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return "";
  const auto close = stat->rfind(')');
  if (close == std::string::npos) return "";
  std::istringstream rest(stat->substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return field;
  return "";
}

bool process_alive(long pid, const std::string& start_ticks) {
  if (pid <= 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno != EPERM) return false;
  const std::string now = process_start_ticks(pid);
  return start_ticks.empty() || now.empty() || now == start_ticks;
}

}  // namespace

std::string checkpoint_name(int64_t step) {
  std::ostringstream s;
  s << "step-" << std::setw(8) << std::setfill('0') << step;
  return s.str();
}

std::string unresumed_checkpoints_refusal(const std::string& dir) {
  const auto existing = list_checkpoints(dir);
  if (existing.empty()) return "";
  return "train.checkpoint_dir '" + dir + "' already holds " + std::to_string(existing.size()) +
         " checkpoint(s) (newest '" + existing.back().path + "', step " + std::to_string(existing.back().step) +
         ") that this run did not resume from. Continue them with --resume, or start over with --overwrite "
         "(moves them into '" + dir + "/superseded-<UTC time>/'; nothing is deleted)";
}

std::vector<CheckpointInfo> list_checkpoints(const std::string& dir) {
  std::vector<CheckpointInfo> complete;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return complete;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!is_step_entry(name) || is_unfinished(name) || !e.is_directory(ec)) continue;
    if (!fs::exists(e.path() / "manifest.pb", ec)) continue;  // not a complete checkpoint
    const auto manifest = read_manifest(e.path());
    if (!manifest) {
      LOOM_LOG(kWarn) << "checkpoint '" << e.path().string() << "': manifest does not parse: skipped";
      continue;
    }
    complete.push_back({e.path().string(), manifest->step()});
  }
  std::sort(complete.begin(), complete.end(), [](const CheckpointInfo& a, const CheckpointInfo& b) {
    return a.step != b.step ? a.step < b.step : a.path < b.path;
  });
  return complete;
}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  const auto complete = list_checkpoints(dir);
  if (complete.empty()) return std::nullopt;
  return complete.back().path;
}

CheckpointData load_checkpoint(const std::string& path) {
  const fs::path manifest_path = fs::path(path) / "manifest.pb";
  CheckpointData data;
  {
    std::ifstream in(manifest_path, std::ios::binary);
    if (!in) throw LoomError("checkpoint '" + manifest_path.string() + "': cannot open");
    if (!data.manifest.ParseFromIstream(&in))
      throw LoomError("checkpoint '" + manifest_path.string() + "': manifest does not parse (corrupt)");
  }
  const fs::path state_path = fs::path(path) / data.manifest.state_file();
  std::ifstream in(state_path, std::ios::binary | std::ios::ate);
  if (!in) throw LoomError("checkpoint '" + state_path.string() + "': cannot open");
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  if (size != data.manifest.state_bytes())
    throw LoomError("checkpoint '" + state_path.string() + "' is " + std::to_string(size) + " bytes, the manifest says " +
                    std::to_string(data.manifest.state_bytes()) + " (truncated or corrupt): refusing to load it");
  std::vector<char> bytes(size);
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (fnv1a64(bytes.data(), bytes.size()) != data.manifest.state_checksum())
    throw LoomError("checkpoint '" + state_path.string() + "': checksum mismatch (corrupt): refusing to load it");
  for (const auto& e : data.manifest.tensors()) {
    std::vector<int64_t> shape(e.shape().begin(), e.shape().end());
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype_from_name(e.dtype(), state_path.string())));
    if (e.offset() + e.bytes() > size || e.bytes() != t.nbytes())
      throw LoomError("checkpoint '" + state_path.string() + "': entry '" + e.name() + "' is out of range");
    std::memcpy(t.data_ptr(), bytes.data() + e.offset(), e.bytes());
    data.tensors.emplace_back(e.name(), t);
  }
  return data;
}

std::string save_checkpoint(const std::string& dir, const CheckpointData& data) {
  return write_checkpoint(dir, data, /*replace_existing=*/false);
}

std::string move_checkpoints_aside(const std::string& dir) {
  std::vector<fs::path> entries;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (is_step_entry(e.path().filename().string())) entries.push_back(e.path());
  if (entries.empty()) return "";
  const fs::path aside = make_superseded_dir(dir);
  for (const auto& e : entries) move_into(e, aside);
  fsync_path(dir);
  return aside.string();
}

CheckpointWriter::CheckpointWriter(std::string dir, int64_t keep) : dir_(std::move(dir)), keep_(keep) {}

std::string CheckpointWriter::adopt_earlier(const std::string& resumed) {
  const auto manifest = read_manifest(resumed);
  pb::LoomConfig saved;
  try {
    if (!manifest) throw ConfigError("no readable manifest");
    parse_config_text(manifest->config_text(), resumed + "/manifest.pb (config_text)", &saved);
  } catch (const std::exception& e) {
    return "train.keep_checkpoints counts this session's checkpoints only: the resumed checkpoint's config does "
           "not parse here (" + std::string(e.what()) + ")";
  }
  const auto earlier = list_checkpoints(dir_);
  const int64_t saved_keep = saved.train().keep_checkpoints();
  if (saved_keep == 0)
    return "train.keep_checkpoints counts this session's checkpoints only: the resumed run kept every checkpoint "
           "(keep_checkpoints 0), its " + std::to_string(earlier.size()) + " stay";
  for (const CheckpointInfo& c : earlier)
    if (std::none_of(kept_.begin(), kept_.end(), [&](const CheckpointInfo& k) { return k.step == c.step; }))
      kept_.push_back(c);
  std::sort(kept_.begin(), kept_.end(), [](const CheckpointInfo& a, const CheckpointInfo& b) { return a.step < b.step; });
  if (keep_ > 0 && keep_ < saved_keep && static_cast<int64_t>(kept_.size()) >= keep_)
    return "train.keep_checkpoints is " + std::to_string(keep_) + " (the resumed run kept " +
           std::to_string(saved_keep) + "): the next save prunes the directory's " + std::to_string(kept_.size()) +
           " checkpoints down to the newest " + std::to_string(keep_);
  return "";
}

std::string CheckpointWriter::save(const CheckpointData& data) {
  const int64_t step = data.manifest.step();
  const bool mine = std::any_of(kept_.begin(), kept_.end(), [&](const CheckpointInfo& c) { return c.step == step; });
  const std::string path = write_checkpoint(dir_, data, /*replace_existing=*/mine);
  if (!mine) {
    kept_.push_back({path, step});
    std::sort(kept_.begin(), kept_.end(), [](const CheckpointInfo& a, const CheckpointInfo& b) { return a.step < b.step; });
  }
  while (keep_ > 0 && static_cast<int64_t>(kept_.size()) > keep_) {
    std::error_code ec;
    fs::remove_all(kept_.front().path, ec);
    kept_.erase(kept_.begin());
  }
  return path;
}

void check_directory_writable(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw RunRefused("checkpoint directory '" + dir + "' cannot be created: " +
                     (ec ? ec.message() : std::string("a file of that name is in the way")));
  const std::string probe = (fs::path(dir) / (".loom-write-test-" + std::to_string(::getpid()))).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw RunRefused("checkpoint directory '" + dir + "' is not writable: " + std::strerror(errno));
  const bool ok = ::write(fd, "ok\n", 3) == 3 && ::fsync(fd) == 0;
  const int write_errno = errno;
  ::close(fd);
  ::unlink(probe.c_str());
  if (!ok) throw RunRefused("checkpoint directory '" + dir + "' is not writable: " + std::strerror(write_errno));
}

std::string CheckpointDirLock::refusal_for(const std::string& dir, const std::string& held, std::string* who) {
  auto fields = parse_lock(held);
  const std::string host = fields["host"], since = fields["since"];
  const long holder = std::atol(fields["pid"].c_str());
  *who = "host " + (host.empty() ? std::string("?") : host) + " pid " + std::to_string(holder) +
         (since.empty() ? std::string() : " (since " + since + ")");
  if (host == host_name() && !process_alive(holder, fields["started"])) return "";
  return "checkpoint directory '" + dir + "' is in use by another job: " + *who + " holds '" +
         (fs::path(dir) / kFileName).string() +
         "'. Two jobs must not write one directory: wait for that job to end or use another train.checkpoint_dir" +
         (host != host_name() ? " (if that job is gone, delete the lock file)" : std::string());
}

std::string CheckpointDirLock::holder_refusal(const std::string& dir) {
  const auto held = read_small_file((fs::path(dir) / kFileName).string());
  std::string who;
  return held ? refusal_for(dir, *held, &who) : "";
}

CheckpointDirLock::CheckpointDirLock(const std::string& dir, const std::string& run_id)
    : path_((fs::path(dir) / kFileName).string()) {
  const long pid = static_cast<long>(::getpid());
  std::ostringstream content;
  content << "host " << host_name() << "\npid " << pid << "\nstarted " << process_start_ticks(pid) << "\nsince "
          << utc_stamp() << "\nrun " << run_id << "\n";
  content_ = content.str();
  for (int attempt = 0; attempt < 5; ++attempt) {
    const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd >= 0) {
      const bool ok = ::write(fd, content_.data(), content_.size()) == static_cast<ssize_t>(content_.size()) &&
                      ::fsync(fd) == 0;
      const int write_errno = errno;
      ::close(fd);
      if (!ok) {
        ::unlink(path_.c_str());
        throw RunRefused("cannot write the lock file '" + path_ + "': " + std::strerror(write_errno));
      }
      fsync_path(dir);
      return;
    }
    if (errno != EEXIST) throw RunRefused("cannot create the lock file '" + path_ + "': " + std::strerror(errno));
    const auto held = read_small_file(path_);
    if (!held) continue;  // released meanwhile: try again
    std::string who;
    const std::string refusal = refusal_for(dir, *held, &who);
    if (!refusal.empty()) throw RunRefused(refusal);
    // The holder is gone: move its lock away, making sure it is still that one.
    const std::string stale = path_ + ".stale-" + std::to_string(pid);
    if (::rename(path_.c_str(), stale.c_str()) != 0) continue;
    const auto moved = read_small_file(stale);
    if (moved && *moved != *held) {  // a live job claimed it in between: give it back
      if (::link(stale.c_str(), path_.c_str()) != 0 && errno != EEXIST)
        LOOM_LOG(kWarn) << "lock file '" << path_ << "': could not restore it: " << std::strerror(errno);
      ::unlink(stale.c_str());
      continue;
    }
    ::unlink(stale.c_str());
    takeover_note_ = "took over the lock '" + path_ + "' left by " + who + ": that process is no longer running";
  }
  throw RunRefused("cannot claim the lock file '" + path_ + "': other jobs keep claiming it");
}

CheckpointDirLock::~CheckpointDirLock() {
  const auto held = read_small_file(path_);
  if (held && *held == content_) ::unlink(path_.c_str());
}

}  // namespace loom
