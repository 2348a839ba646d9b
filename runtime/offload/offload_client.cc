#include "loom/runtime/offload/offload_client.h"

#include "loom/runtime/comm/watchdog.h"

namespace loom::offload {

using Msg = pb::OffloadMessage;

OffloadClient::OffloadClient(CommPtr comm, std::vector<int> memory_ranks, int group)
    : comm_(std::move(comm)), memory_ranks_(std::move(memory_ranks)), group_(group) {
  TORCH_CHECK(!memory_ranks_.empty(), "OffloadClient: no memory nodes");
}

Msg OffloadClient::request(int node, Msg msg, const std::vector<at::Tensor>& payloads, std::vector<at::Tensor>* reply) {
  const int peer = memory_rank(node);
  msg.set_version(kProtocolVersion);
  msg.set_group(group_);
  msg.clear_payloads();
  for (const auto& t : payloads) *msg.add_payloads() = spec_of(t);
  auto fail = [&](const Msg& r) {
    return OffloadError(r.error().empty() ? std::string("memory node rank ") + std::to_string(peer) +
                                                         " answered " + type_name(r.type()) + " to " +
                                                         type_name(msg.type())
                                                   : r.error());
  };
  const WatchdogContext waiting("offload " + std::string(type_name(msg.type())) + " of call " +
                                std::to_string(msg.call()) + " with memory node rank " + std::to_string(peer));
  int64_t ack_bytes = 0, reply_bytes = 0;
  control_ += send_control(*comm_, peer, msg);
  const Msg ack = receive_message(*comm_, peer, nullptr, &ack_bytes);
  control_ += ack_bytes;
  if (ack.type() != Msg::OK) throw fail(ack);
  send_payloads(*comm_, peer, payloads);
  std::vector<at::Tensor> received;
  const Msg r = receive_message(*comm_, peer, &received, &reply_bytes);
  control_ += reply_bytes;
  if (r.type() != Msg::OK) throw fail(r);
  if (r.stop_requested() && stopping_node_ < 0) stopping_node_ = node;
  for (const auto& t : payloads) payload_sent_ += static_cast<int64_t>(t.nbytes());
  for (const auto& t : received) payload_received_ += static_cast<int64_t>(t.nbytes());
  if (reply) *reply = std::move(received);
  return r;
}

int64_t OffloadClient::next_call() { return next_call_++; }

void OffloadClient::close_calls(const CommPtr& sp) {
  if (first_open_call_ == next_call_) return;
  sp->barrier()->wait();  // every rank of the group is done with them
  if (sp->rank() == 0)
    for (int64_t call = first_open_call_; call < next_call_; ++call)
      for (int node = 0; node < nodes(); ++node) {
        Msg m;
        m.set_type(Msg::CLOSE);
        m.set_call(call);
        request(node, m, {});
      }
  sp->barrier()->wait();  // on return, the memory is free for every rank
  first_open_call_ = next_call_;
}

void OffloadClient::close_sequences(const std::vector<int64_t>& sequences) {
  Msg m;
  m.set_type(Msg::CLOSE);
  for (int64_t s : sequences) m.add_sequences(s);
  for (int node = 0; node < nodes(); ++node) request(node, m, {});
}

std::string OffloadClient::stop_requested() {
  for (int node = 0; node < nodes() && stopping_node_ < 0; ++node) {
    Msg m;
    m.set_type(Msg::STATS);
    request(node, m, {});
  }
  if (stopping_node_ < 0) return "";
  return "a signal to memory node rank " + std::to_string(memory_rank(stopping_node_));
}

void OffloadClient::shutdown() {
  for (int node = 0; node < nodes(); ++node) {
    Msg m;
    m.set_type(Msg::SHUTDOWN);
    request(node, m, {});
  }
}

}  // namespace loom::offload
