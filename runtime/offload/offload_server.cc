#include "loom/runtime/offload/offload_server.h"

#include <chrono>
#include <csignal>
#include <set>
#include <cstdlib>
#include <thread>

#include "loom/runtime/core/logging.h"
#include "loom/runtime/core/stop_signals.h"

namespace loom::offload {
namespace {

using Msg = pb::OffloadMessage;

Msg reply(Msg::Type type) {
  Msg m;
  m.set_type(type);
  return m;
}

int64_t bytes_of(const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }

std::string shape_text(const pb::OffloadTensorSpec& spec) {
  return c10::str(c10::IntArrayRef(spec.shape().data(), static_cast<size_t>(spec.shape_size())));
}

}  // namespace

OffloadServer::OffloadServer(CommPtr comm, std::vector<int> clients, int64_t capacity_bytes, OffloadKernels kernels)
    : comm_(std::move(comm)), clients_(std::move(clients)), capacity_bytes_(capacity_bytes), kernels_(std::move(kernels)) {
  TORCH_CHECK(kernels_.attend && kernels_.attend_backward && kernels_.attend_newest,
              "OffloadServer: attention kernels are missing");
}

std::string OffloadServer::describe(const Msg& req) const {
  return std::string(type_name(req.type())) + " for call " + std::to_string(req.call()) + " of group " +
         std::to_string(req.group());
}

OffloadServer::Call& OffloadServer::call_of(const Msg& req) {
  auto it = calls_.find({req.group(), req.call()});
  if (it == calls_.end()) throw OffloadError(describe(req) + ": no K,V stored for this call");
  return it->second;
}
const OffloadServer::Call& OffloadServer::call_of(const Msg& req) const {
  return const_cast<OffloadServer*>(this)->call_of(req);
}

void OffloadServer::validate(const Msg& req) const {
  const std::string what = describe(req);
  auto payloads = [&](int n) {
    if (req.payloads_size() != n)
      throw OffloadError(what + ": " + std::to_string(req.payloads_size()) + " payloads, expected " + std::to_string(n));
  };
  const int64_t bytes = payload_bytes(req, kMaxPayloadBytes);  // dtypes, shapes, the hard limit
  const bool documents = req.documents();
  if (documents && req.type() != Msg::ATTEND && req.type() != Msg::ATTEND_BACKWARD)
    throw OffloadError(what + ": only ATTEND and ATTEND_BACKWARD carry documents");
  // The doc_start payload (the last) is [B, L] of the query payload [B, H, L, d].
  auto document_payload = [&]() {
    if (!documents) return;
    const auto &q = req.payloads(0), &ds = req.payloads(req.payloads_size() - 1);
    if (q.shape_size() != 4 || ds.shape_size() != 2 || ds.shape(0) != q.shape(0) || ds.shape(1) != q.shape(2))
      throw OffloadError(what + ": doc_start " + shape_text(ds) + " must be [B, L] of the query " + shape_text(q));
  };
  switch (req.type()) {
    case Msg::STORE_KV: {
      payloads(2);
      if (bytes_in_use_ + bytes > capacity_bytes_)
        throw OffloadError(what + ": capacity exceeded: " + std::to_string(bytes) + " bytes requested, " +
                           std::to_string(bytes_in_use_) + " of " + std::to_string(capacity_bytes_) +
                           " in use (close sequences, raise offload.capacity_mb or add memory ranks)");
      auto it = calls_.find({req.group(), req.call()});
      if (it != calls_.end())
        for (const auto& c : it->second.chunks)
          if (c.start == req.start())
            throw OffloadError(what + ": a chunk at position " + std::to_string(req.start()) + " is already stored");
      return;
    }
    case Msg::ATTEND:
      payloads(documents ? 2 : 1);
      document_payload();
      call_of(req);
      return;
    case Msg::ATTEND_BACKWARD:
      payloads(documents ? 5 : 4);
      document_payload();
      call_of(req);
      return;
    case Msg::FETCH_DKV: {
      payloads(0);
      for (const auto& c : call_of(req).chunks)
        if (c.start == req.start()) return;
      throw OffloadError(what + ": no chunk stored at position " + std::to_string(req.start()));
    }
    case Msg::DECODE: {
      payloads(3);
      const auto& q = req.payloads(0);
      if (q.shape_size() != 4 || q.shape(0) != req.sequences_size() || q.shape(2) != 1)
        throw OffloadError(what + ": q must be [sequences = " + std::to_string(req.sequences_size()) +
                           ", heads, 1, d]");
      Msg kv;  // what stays: the new keys and values
      *kv.add_payloads() = req.payloads(1);
      *kv.add_payloads() = req.payloads(2);
      const int64_t kept = payload_bytes(kv, kMaxPayloadBytes);
      int64_t fresh = 0;
      for (int64_t s : req.sequences())
        if (!caches_.count({req.group(), req.call(), s})) ++fresh;
      if (bytes_in_use_ + kept > capacity_bytes_)
        throw OffloadError(what + ": memory node full: caching " + std::to_string(req.sequences_size()) +
                           " sequence(s) (" + std::to_string(fresh) + " new) needs " + std::to_string(kept) +
                           " more bytes, " + std::to_string(bytes_in_use_) + " of " + std::to_string(capacity_bytes_) +
                           " in use (close finished sequences or raise offload.capacity_mb)");
      return;
    }
    case Msg::CLOSE:
    case Msg::STATS:
    case Msg::SHUTDOWN:
      payloads(0);
      return;
    default:
      throw OffloadError("message type " + std::to_string(static_cast<int>(req.type())) +
                         " is not a request (expected STORE_KV, ATTEND, ATTEND_BACKWARD, FETCH_DKV, DECODE, CLOSE, "
                         "STATS or SHUTDOWN)");
  }
}

Msg OffloadServer::execute(const Msg& req, std::vector<at::Tensor>& in, std::vector<at::Tensor>& out, bool& shutdown) {
  const std::string what = describe(req);
  const at::Tensor doc_start = req.documents() ? in.back() : at::Tensor();  // validated: ATTEND*
  switch (req.type()) {
    case Msg::STORE_KV: {
      if (in[0].dim() != 4 || in[0].sizes() != in[1].sizes())
        throw OffloadError(what + ": K " + c10::str(in[0].sizes()) + " and V " + c10::str(in[1].sizes()) +
                           " must be equal [B, H, L, d]");
      Call& call = calls_[{req.group(), req.call()}];
      const int64_t bytes = bytes_of(in[0]) + bytes_of(in[1]);
      call.chunks.push_back(StoredChunk{req.start(), in[0], in[1], {}, {}});
      call.bytes += bytes;
      bytes_in_use_ += bytes;
      return reply(Msg::OK);
    }
    case Msg::ATTEND: {
      const Call& call = call_of(req);
      const at::Tensor& q = in[0];
      const at::Tensor& k0 = call.chunks.front().k;
      if (q.dim() != 4 || q.size(0) != k0.size(0) || q.size(3) != k0.size(3) || q.size(1) % k0.size(1) != 0)
        throw OffloadError(what + ": q " + c10::str(q.sizes()) + " does not fit the stored K " + c10::str(k0.sizes()));
      auto [o, lse] = kernels_.attend(q, req.start(), doc_start, call.chunks, req);
      out = {o, lse};
      return reply(Msg::OK);
    }
    case Msg::ATTEND_BACKWARD: {
      Call& call = call_of(req);
      int64_t added = 0;
      for (const auto& c : call.chunks)
        if (!c.dk.defined()) added += 2 * c.k.numel() * static_cast<int64_t>(c10::elementSize(in[1].scalar_type()));
      if (bytes_in_use_ + added > capacity_bytes_)
        throw OffloadError(what + ": capacity exceeded by the gradient accumulators (" + std::to_string(added) +
                           " bytes)");
      call.bytes += added;
      bytes_in_use_ += added;
      out = {kernels_.attend_backward(in[0], in[1], in[2], in[3], req.start(), doc_start, call.chunks, req)};
      return reply(Msg::OK);
    }
    case Msg::FETCH_DKV: {
      for (const auto& c : call_of(req).chunks)
        if (c.start == req.start())
          out = {c.dk.defined() ? c.dk : at::zeros_like(c.k), c.dv.defined() ? c.dv : at::zeros_like(c.v)};
      return reply(Msg::OK);
    }
    case Msg::DECODE: {
      std::vector<at::Tensor> outs;
      for (int i = 0; i < req.sequences_size(); ++i) {
        DecodeCache& c = caches_[{req.group(), req.call(), req.sequences(i)}];
        const at::Tensor k = in[1].narrow(0, i, 1), v = in[2].narrow(0, i, 1);
        c.k = c.k.defined() ? at::cat({c.k, k}, 2) : k.clone();
        c.v = c.v.defined() ? at::cat({c.v, v}, 2) : v.clone();
        bytes_in_use_ += bytes_of(k) + bytes_of(v);
        outs.push_back(kernels_.attend_newest(in[0].narrow(0, i, 1), c.k, c.v, req));
      }
      out = {at::cat(outs, 0)};
      return reply(Msg::OK);
    }
    case Msg::CLOSE: {
      if (req.sequences_size() > 0) {  // generation: these sequences' caches, every layer
        const std::set<int64_t> closing(req.sequences().begin(), req.sequences().end());
        for (auto it = caches_.begin(); it != caches_.end();) {
          if (std::get<0>(it->first) == req.group() && closing.count(std::get<2>(it->first))) {
            bytes_in_use_ -= bytes_of(it->second.k) + bytes_of(it->second.v);
            it = caches_.erase(it);
          } else {
            ++it;
          }
        }
        return reply(Msg::OK);
      }
      auto it = calls_.find({req.group(), req.call()});
      if (it != calls_.end()) {
        bytes_in_use_ -= it->second.bytes;
        calls_.erase(it);
      }
      return reply(Msg::OK);
    }
    case Msg::STATS: {
      Msg r = reply(Msg::OK);
      r.set_bytes_in_use(bytes_in_use_);
      r.set_calls_open(static_cast<int64_t>(calls_.size()));
      std::set<std::pair<int, int64_t>> sequences;
      for (const auto& [key, cache] : caches_) sequences.insert({std::get<0>(key), std::get<2>(key)});
      r.set_sequences_open(static_cast<int64_t>(sequences.size()));
      return r;
    }
    case Msg::SHUTDOWN:
      shutdown = true;
      return reply(Msg::OK);
    default: break;
  }
  throw OffloadError(what + ": not a request");
}

void OffloadServer::handle(int client, const at::Tensor& header, bool& shutdown) {
  auto error = [&](const std::string& message) {
    Msg r = reply(Msg::ERROR);
    r.set_error("memory node (rank " + std::to_string(comm_->rank()) + "): " + message);
    LOOM_LOG(kWarn) << r.error() << " (from rank " << client << ")";
    send_message(*comm_, client, r, {});
  };
  Msg req;
  try {
    req = receive_control(*comm_, client, header);
    validate(req);
  } catch (const OffloadError& e) {
    error(e.what());  // refused before any payload travelled
    return;
  }
  send_message(*comm_, client, reply(Msg::OK), {});  // acknowledgement: send the payloads
  std::vector<at::Tensor> in = receive_payloads(*comm_, client, req), out;
  try {
    Msg r = execute(req, in, out, shutdown);
    if (stop_requested_) r.set_stop_requested(true);  // the compute ranks stop after this step
    send_message(*comm_, client, r, out);
  } catch (const OffloadError& e) {
    error(e.what());
  } catch (const c10::Error& e) {
    error(describe(req) + ": " + e.what_without_backtrace());
  }
}

void OffloadServer::serve() {
  // Fault injection for the tests: stop answering, or die, after n requests.
  const char* stall = std::getenv("LOOM_FAULT_MEMORY_NODE_STALL_AFTER");
  const char* die = std::getenv("LOOM_FAULT_MEMORY_NODE_KILL_AFTER");
  const int64_t stall_after = stall ? std::atoll(stall) : -1, die_after = die ? std::atoll(die) : -1;
  int64_t handled = 0;
  struct Pending {
    int client;
    at::Tensor header;
    WorkPtr work;
  };
  std::vector<Pending> pending;
  for (int c : clients_) {
    Pending p{c, {}, nullptr};
    p.work = post_header(*comm_, c, p.header);
    pending.push_back(std::move(p));
  }
  // A signalled memory node must not just die (the compute ranks would lose
  // their step and checkpoint): it keeps serving, and its replies ask the
  // compute ranks to stop after their current step; they then shut it down.
  const StopSignalScope signals("[loom memory node, rank " + std::to_string(comm_->rank()) + "] ",
                                "this memory node keeps serving; the compute ranks stop after their current step, "
                                "save a checkpoint and shut it down",
                                "ignored: serving until the compute ranks have stopped");
  auto idle = std::chrono::microseconds(20);
  while (!pending.empty()) {
    if (!stop_requested_ && signals.received() > 0) {
      stop_requested_ = true;
      LOOM_LOG(kWarn) << "memory node: " << signal_name(signals.last_signal())
                      << " received: asking the compute ranks to stop after their current step";
    }
    bool progressed = false;
    for (size_t i = 0; i < pending.size();) {
      if (!pending[i].work->is_completed()) {
        ++i;
        continue;
      }
      progressed = true;
      pending[i].work->wait();
      if (handled == die_after) std::raise(SIGKILL);
      while (handled == stall_after) std::this_thread::sleep_for(std::chrono::seconds(1));
      ++handled;
      bool shutdown = false;
      handle(pending[i].client, pending[i].header, shutdown);
      if (shutdown) {
        pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        pending[i].work = post_header(*comm_, pending[i].client, pending[i].header);
        ++i;
      }
    }
    // Back off while idle: memory nodes may share cores with compute ranks.
    idle = progressed ? std::chrono::microseconds(20) : std::min(idle * 2, std::chrono::microseconds(2000));
    if (!progressed) std::this_thread::sleep_for(idle);
  }
}

}  // namespace loom::offload
