#pragma once
// The guest walled off from the host: no connection from QEMU's user to any address
// of the host itself (127.0.0.0/8, ::1, and every address of every interface), while
// connections to other machines ("the internet") go on working.
//
// DESIGN: why nftables rules bound to QEMU's dedicated user, and not passt or
// slirp4netns. User-mode networking (libslirp) makes every guest connection from
// QEMU's own process on the host, so the host sees these connections as QEMU's.
// - libslirp in QEMU 7.2's `-netdev user` has only `restrict=on`, which cuts all
//   outbound traffic; it has no switch for the 10.0.2.2 → 127.0.0.1 mapping.
// - passt `--no-map-gw` and slirp4netns `--disable-host-loopback` close the gateway
//   mapping only: the guest still reaches every service that listens on the host's
//   other addresses (0.0.0.0 listeners among them), and each adds a helper process
//   and a new way to learn the SSH port.
// - One rule, `meta skuid <qemu user> ct state new fib daddr type local reject`,
//   refuses every new connection from QEMU to any address the host owns, the
//   gateway mapping and addresses added later included, and needs nothing per job:
//   the netdev, the SSH forward (inbound to QEMU's listener) and its port discovery
//   through QMP stay exactly as they were, so SSH readiness and throughput do not
//   change. The cost: it needs root, which is also what a dedicated QEMU user needs
//   (runtime/vm/qemu_user.hpp). A runner that is not root cannot wall the guest off
//   and says so.
// DNS: slirp forwards the guest's queries to the host's resolvers, which may listen
// on loopback (127.0.0.53); port 53 on loopback stays open for that.
#include <sys/types.h>

#include <string>

#include "runtime/base/error.hpp"

namespace solstice {

// The nftables table holding the rules ("inet solstice_runner"); it outlives the
// runner (it only touches QEMU's users) and `nft delete table inet solstice_runner`
// removes it.
inline constexpr const char* guest_firewall_table = "solstice_runner";

// Installs (idempotently, in one atomic nftables transaction; concurrent runners are
// fine) the rules refusing connections from processes of `uid` to host addresses.
// Errors name nftables' own message and what to do.
Result<void> wall_off_host(uid_t uid);

}  // namespace solstice
