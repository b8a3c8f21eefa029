#include "runtime/vm/guest_firewall.hpp"

#include <nftables/libnftables.h>

#include <memory>

namespace solstice {

namespace {

// The ruleset as `nft -f` text: table, set of QEMU users and chain are added when
// missing, the chain's rules replaced, the uid added to the set. libnftables runs
// the whole buffer as one transaction, so no connection ever sees a half-made chain.
std::string ruleset_for(uid_t uid) {
  const std::string t = std::string("inet ") + guest_firewall_table;
  return "add table " + t + "\n" +
         "add set " + t + " qemu_users { typeof meta skuid; }\n" +
         "add chain " + t +
         " output { type filter hook output priority filter; policy accept; }\n" +
         "flush chain " + t + " output\n" +
         // The host's resolvers on loopback, which slirp forwards the guest's DNS to.
         "add rule " + t + " output meta skuid @qemu_users ct state new " +
         "ip daddr 127.0.0.0/8 meta l4proto { tcp, udp } th dport 53 accept\n" +
         "add rule " + t + " output meta skuid @qemu_users ct state new " +
         "ip6 daddr ::1 meta l4proto { tcp, udp } th dport 53 accept\n" +
         // Every other new connection to an address of this host.
         "add rule " + t + " output meta skuid @qemu_users ct state new " +
         "fib daddr type local reject\n" +
         "add element " + t + " qemu_users { " + std::to_string(uid) + " }\n";
}

}  // namespace

Result<void> wall_off_host(uid_t uid) {
  std::unique_ptr<nft_ctx, decltype(&nft_ctx_free)> ctx(nft_ctx_new(NFT_CTX_DEFAULT), nft_ctx_free);
  if (!ctx)
    return fail("cannot wall the guest off from the host: nftables context not made");
  nft_ctx_buffer_output(ctx.get());
  nft_ctx_buffer_error(ctx.get());
  const std::string rules = ruleset_for(uid);
  if (nft_run_cmd_from_buffer(ctx.get(), rules.c_str()) != 0) {
    std::string why = nft_ctx_get_error_buffer(ctx.get());
    while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
    return fail("cannot wall the guest off from the host (nftables table inet " +
                std::string(guest_firewall_table) + " for uid " + std::to_string(uid) +
                "): " + why +
                " (the kernel needs nf_tables with the fib and reject modules; or set "
                "qemu_user to \"\", which leaves the host reachable from the guest)");
  }
  return {};
}

}  // namespace solstice
