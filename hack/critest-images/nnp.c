/* nnp: what e2e-test-images/nonewprivs runs. Installed setuid root; critest reads the
 * printed effective uid to see whether no_new_privs stopped the setuid from taking effect. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
  printf("Effective uid: %d\n", geteuid());
  return 0;
}
