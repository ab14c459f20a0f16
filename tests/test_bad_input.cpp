#include <gtest/gtest.h>
TEST(Placeholderbad_input, Builds) {}
