/* pause: the sandbox (infra) container's process, like registry.k8s.io/pause.
 * Sleeps until SIGINT/SIGTERM and reaps zombies, as PID 1 of a pod must. */
#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int signo) { (void)signo; exit(0); }
static void on_child(int signo) { (void)signo; while (waitpid(-1, NULL, WNOHANG) > 0) ; }

int main(void) {
  struct sigaction stop = { .sa_handler = on_stop };
  struct sigaction child = { .sa_handler = on_child, .sa_flags = SA_NOCLDSTOP };
  sigaction(SIGINT, &stop, NULL);
  sigaction(SIGTERM, &stop, NULL);
  sigaction(SIGCHLD, &child, NULL);
  for (;;) pause();
  return 1;
}
